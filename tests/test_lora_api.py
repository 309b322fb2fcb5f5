"""LoRA and embeddings through the HTTP API (real server, real backend process): A1111's list and refresh
routes, `<lora:...>` in API prompts, infotext hashes, warnings in `info`, and exact restoration."""
from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import torch
from PIL import Image

from lora_factory import save_embedding, save_lora, simple_lora

CKPT = {"sd_model_checkpoint": "tiny-sd1.safetensors"}


def generate(api, prompt: str, negative: str = "") -> tuple[np.ndarray, dict]:
    r = api.post("/txt2img", json={"prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 64, "height": 64,
                                    "seed": 99, "sampler_name": "Euler", "cfg_scale": 5, "override_settings": CKPT})
    assert r.status_code == 200, r.text
    body = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    return np.asarray(img).astype(np.int32), json.loads(body["info"])


def test_lora_lists_and_refresh(server, api):
    lora_dir = server.data_dir / "models" / "Lora"
    save_lora(lora_dir / "api_styles" / "api_listed.safetensors", simple_lora("sd1", seed=21), family="sd1",
              metadata={"ss_output_name": "listed_alias", "ss_resolution": "(512, 512)",
                        "ss_tag_frequency": json.dumps({"img": {"red": 3, "house": 2}})})
    save_lora(server.data_dir / "models" / "LyCORIS" / "api_lyco.safetensors", simple_lora("sd1", seed=22))
    assert api.post("/refresh-loras").status_code == 200
    loras = {x["name"]: x for x in api.get("/loras").json()}
    entry = loras["api_listed"]
    assert set(entry) == {"name", "alias", "path", "metadata"}
    assert entry["alias"] == "listed_alias" and entry["path"].endswith("api_listed.safetensors")
    assert entry["metadata"]["ss_resolution"] == "(512, 512)" and entry["metadata"]["ss_base_model_version"] == "sd_v1"
    assert loras["api_lyco"]["alias"] == "api_lyco"
    save_lora(lora_dir / "api_new.safetensors", simple_lora("sd1", seed=23))
    assert "api_new" not in {x["name"] for x in api.get("/loras").json()}
    api.post("/refresh-loras")
    assert "api_new" in {x["name"] for x in api.get("/loras").json()}


def test_lora_in_api_prompts(server, api):
    path = save_lora(server.data_dir / "models" / "Lora" / "api_fancy.safetensors", simple_lora("sd1", seed=24), family="sd1")
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    before, _ = generate(api, "a red house")
    lora, info = generate(api, "a red house <lora:api_fancy:0.9>")
    assert np.abs(lora - before).mean() > 1.0
    assert info["prompt"] == "a red house <lora:api_fancy:0.9>"
    assert info["extra_generation_params"]["Lora hashes"] == f"api_fancy: {addnet[:12]}"
    assert f'Lora hashes: "api_fancy: {addnet[:12]}"' in info["infotexts"][0]
    assert not info.get("warnings")
    after, _ = generate(api, "a red house")
    assert np.array_equal(after, before)  # bit-identical once the LoRA is gone
    # the alias from the file's metadata works too
    alias_path = save_lora(server.data_dir / "models" / "Lora" / "api_aliased.safetensors", simple_lora("sd1", seed=24),
                           family="sd1", metadata={"ss_output_name": "my_alias"})
    api.post("/refresh-loras")
    by_alias, info = generate(api, "a red house <lora:my_alias:0.9>")
    assert np.array_equal(by_alias, lora) and "my_alias: " in info["extra_generation_params"]["Lora hashes"]
    assert alias_path.exists()


def test_bad_loras_warn_in_info(server, api):
    lora_dir = server.data_dir / "models" / "Lora"
    (lora_dir / "api_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    save_lora(lora_dir / "api_xl.safetensors", simple_lora("sdxl", seed=25), family="sdxl")
    before, _ = generate(api, "a boat")
    pixels, info = generate(api, "a boat <lora:api_missing:1> <lora:api_corrupt:1> <lora:api_xl:1>")
    assert np.array_equal(pixels, before)
    warnings = "\n".join(info["warnings"])
    assert "Couldn't find Lora with name api_missing" in warnings
    assert "api_corrupt.safetensors" in warnings
    assert "api_xl" in warnings and "SDXL" in warnings


def test_embeddings_list_refresh_and_use(server, api):
    folder = server.data_dir / "embeddings"
    fit = save_embedding(folder / "api_shiny.pt", torch.randn(2, 32, generator=torch.Generator().manual_seed(4)) * 3)
    save_embedding(folder / "api_xl_emb.safetensors", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)})
    api.post("/refresh-embeddings")
    body = api.get("/embeddings").json()
    assert set(body) == {"loaded", "skipped"}
    # the selected checkpoint decides what fits (the tiny SD 1.x one unless another test chose SDXL)
    xl = api.get("/options").json()["sd_model_checkpoint"].startswith("tiny-sdxl")
    fits, misfits = (body["loaded"], body["skipped"]) if not xl else (body["skipped"], body["loaded"])
    assert fits["api_shiny"] == {"step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "tiny",
                                 "shape": 32, "vectors": 2}
    assert misfits["api_xl_emb"]["shape"] == 96 and misfits["api_xl_emb"]["vectors"] == 1
    pixels, info = generate(api, "a api_shiny tower")
    plain, _ = generate(api, "a tower")
    assert not np.array_equal(pixels, plain)
    sha = hashlib.sha256(fit.read_bytes()).hexdigest()
    assert info["extra_generation_params"]["TI hashes"] == f"api_shiny: {sha[:12]}"
    _, info = generate(api, "a api_xl_emb tower")
    assert any("api_xl_emb" in w for w in info["warnings"])


def test_png_info_of_a_lora_image_keeps_the_tags(server, api):
    """An image made with LoRA tags, read back through PNG Info: the tags stay in the prompts (what Send to
    txt2img fills in) and `Lora hashes` is its own parameter, not part of another field."""
    from backend.core.infotext import infotext_to_request_fields

    lora_dir = server.data_dir / "models" / "Lora"
    save_lora(lora_dir / "api_pnginfo.safetensors", simple_lora("sd1", seed=26), family="sd1")
    save_lora(lora_dir / "api_pnginfo_neg.safetensors", simple_lora("sd1", seed=27), family="sd1")
    prompt, negative = "a red house <lora:api_pnginfo:0.8>", "blurry <lora:api_pnginfo_neg:-0.5>"
    r = api.post("/txt2img", json={"prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 64,
                                    "height": 64, "seed": 5, "sampler_name": "Euler", "override_settings": CKPT})
    assert r.status_code == 200, r.text
    hashes = json.loads(r.json()["info"])["extra_generation_params"]["Lora hashes"]
    assert hashes.startswith("api_pnginfo: ") and ", api_pnginfo_neg: " in hashes
    info = api.post("/png-info", json={"image": r.json()["images"][0]})
    assert info.status_code == 200, info.text
    params = info.json()["parameters"]
    assert params["Prompt"] == prompt and params["Negative prompt"] == negative
    assert params["Lora hashes"] == hashes
    assert f'Lora hashes: "{hashes}"' in info.json()["info"]
    fields = infotext_to_request_fields(params)
    assert fields["prompt"] == prompt and fields["negative_prompt"] == negative and fields["seed"] == 5
    assert not any(hashes in str(v) for v in fields.values())
