"""The Checkpoint Merger: results checked tensor by tensor against A1111's formulas, its options, its refusals,
and the API route through a running server (the merged model then generates)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from backend.checkpoints import HashCache, ModelRegistry
from backend.core.checkpoint_merge import MergeRequest
from backend.core.errors import UserError
from backend.engine.checkpoint_merger import run_merge
from backend.merger import plan_merge
from model_factory import write_tiny_checkpoint


class Control:
    """A job control that records progress and can stop after `stop_after` tensors."""

    def __init__(self, stop_after: int | None = None):
        self.steps, self.total, self.stop_after = 0, 0, stop_after

    def interrupted(self) -> bool:
        return self.stop_after is not None and self.steps >= self.stop_after

    def begin(self, job_count, total):
        self.total = total

    def step(self, preview):
        self.steps += 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merger")
    ckpts, vaes = root / "Stable-diffusion", root / "VAE"
    ckpts.mkdir()
    vaes.mkdir()
    write_tiny_checkpoint(ckpts / "a.safetensors", "sd1", seed=11)
    write_tiny_checkpoint(ckpts / "b.safetensors", "sd1", seed=12)
    write_tiny_checkpoint(ckpts / "c.ckpt", "sd1", fmt="ckpt", seed=13)
    write_tiny_checkpoint(ckpts / "inpaint.safetensors", "sd1", seed=14, inpaint=True)
    write_tiny_checkpoint(ckpts / "xl.safetensors", "sdxl", seed=15)
    # a standalone VAE in the A1111 layout (first_stage_model.* of another tiny model, prefix stripped)
    donor = root / "donor.safetensors"
    write_tiny_checkpoint(donor, "sd1", seed=16)
    from safetensors.torch import load_file, save_file
    vae = {k[len("first_stage_model."):]: v for k, v in load_file(str(donor)).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(vaes / "tiny-vae.safetensors"))
    (ckpts / "b.yaml").write_text("model: {}\n")
    return SimpleNamespace(root=root, ckpts=ckpts, vaes=vaes, vae=vae)


@pytest.fixture()
def merge(folders):
    """merge(**request fields) -> (output path, control); the output is removed after the test."""
    registry = ModelRegistry([folders.ckpts], [folders.vaes], HashCache(folders.root / "hashes.json"))
    made = []

    def run(control=None, **fields):
        payload = plan_merge(MergeRequest(**fields), registry, folders.ckpts.resolve())
        made.append(payload["target"])
        made.append(payload["target"].with_suffix(".yaml"))
        control = control or Control()
        result = run_merge(payload, control, registry.hashes)
        return Path(result["path"]), control

    yield run
    for path in made:
        path.unlink(missing_ok=True)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".ckpt":
        return torch.load(path, weights_only=True)["state_dict"]
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def merged_keys(sd):
    return [k for k in sd if "model" in k and k != "cond_stage_model.transformer.text_model.embeddings.position_ids"
            and sd[k].is_floating_point()]


def test_weighted_sum_is_the_formula(folders, merge):
    out, control = merge(primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                         interp_method="Weighted sum", multiplier=0.3)
    assert out.name == "0.7(a) + 0.3(b).safetensors"  # A1111's generated name
    a, b, m = tensors(folders.ckpts / "a.safetensors"), tensors(folders.ckpts / "b.safetensors"), tensors(out)
    assert set(m) == set(a)
    checked = 0
    for key in merged_keys(a):
        expected = a[key] * 0.7 + b[key] * 0.3
        assert torch.allclose(m[key], expected, atol=1e-6), key
        checked += 1
    assert checked > 100 and not torch.equal(m["model.diffusion_model.out.2.weight"], a["model.diffusion_model.out.2.weight"])
    assert control.total == len(a) and control.steps == len(a)  # one progress step per tensor


def test_add_difference_is_the_formula_with_a_ckpt_source(folders, merge):
    out, _ = merge(primary_model_name="a", secondary_model_name="b", tertiary_model_name="c.ckpt",
                   interp_method="Add difference", multiplier=0.5, custom_name="diff")
    assert out.name == "diff.safetensors"
    a, b, c = (tensors(folders.ckpts / n) for n in ("a.safetensors", "b.safetensors", "c.ckpt"))
    m = tensors(out)
    for key in merged_keys(a):
        assert torch.allclose(m[key], a[key] + (b[key] - c[key]) * 0.5, atol=1e-5), key


def test_float16_ckpt_output_discard_and_prune(folders, merge):
    out, _ = merge(primary_model_name="a", secondary_model_name="b", interp_method="Weighted sum", multiplier=0.5,
                   save_as_half=True, checkpoint_format="ckpt", custom_name="half",
                   discard_weights=r"^cond_stage_model\.")
    assert out.suffix == ".ckpt"
    m = tensors(out)
    assert not any(k.startswith("cond_stage_model.") for k in m)
    assert any(k.startswith("model.diffusion_model.") for k in m)
    assert all(v.dtype == torch.float16 for v in m.values() if v.is_floating_point())


def test_no_interpolation_bakes_the_vae_and_copies_the_config(folders, merge):
    out, _ = merge(primary_model_name="b", interp_method="No interpolation", bake_in_vae="tiny-vae.safetensors",
                   custom_name="baked")
    a, m = tensors(folders.ckpts / "b.safetensors"), tensors(out)
    vae_keys = [k for k in m if k.startswith("first_stage_model.")]
    assert len(vae_keys) > 50
    for key in vae_keys:
        assert torch.equal(m[key], folders.vae[key[len("first_stage_model."):]]), key
    unet = "model.diffusion_model.out.2.weight"
    assert torch.equal(m[unet], a[unet])
    assert out.with_suffix(".yaml").read_text() == "model: {}\n"  # "A, B or C": B's yaml beside the result


def test_metadata_recipe(folders, merge):
    out, _ = merge(primary_model_name="a", secondary_model_name="b", multiplier=0.25, custom_name="meta",
                   metadata_json='{"author": "me"}')
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.25
    registry = HashCache(folders.root / "hashes.json")
    a_hash = registry.sha256(folders.ckpts / "a.safetensors")
    assert recipe["primary_model_hash"] == a_hash
    models = json.loads(meta["sd_merge_models"])
    assert models[a_hash]["name"] == "a.safetensors" and len(models[a_hash]["legacy_hash"]) == 8
    assert meta["author"] == "me" and meta["format"] == "pt"
    assert meta["easel_test_family"] == "sd1"  # copied from the sources


def test_inpainting_a_with_regular_b(folders, merge):
    out, _ = merge(primary_model_name="inpaint", secondary_model_name="a", multiplier=0.4)
    assert out.name.endswith(".inpainting.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    i, a, m = tensors(folders.ckpts / "inpaint.safetensors")[key], tensors(folders.ckpts / "a.safetensors")[key], tensors(out)[key]
    assert m.shape[1] == 9
    assert torch.allclose(m[:, :4], i[:, :4] * 0.6 + a * 0.4, atol=1e-6)
    assert torch.equal(m[:, 4:], i[:, 4:])
    with pytest.raises(UserError, match="A must be the inpainting model"):
        merge(primary_model_name="a", secondary_model_name="inpaint")


def test_refusals(folders, merge):
    with pytest.raises(UserError, match=r"different families.*a\.safetensors \(A\) is Stable Diffusion 1\.x.*xl\.safetensors \(B\) is SDXL"):
        merge(primary_model_name="a", secondary_model_name="xl")
    with pytest.raises(UserError, match="requires a tertiary model"):
        merge(primary_model_name="a", secondary_model_name="b", interp_method="Add difference")
    with pytest.raises(UserError, match="regular expression"):
        merge(primary_model_name="a", secondary_model_name="b", discard_weights="(")
    before = sorted(p.name for p in folders.root.rglob("*"))
    for bad in ("../evil", "..", "sub/evil", "..\\evil", ".hidden"):
        with pytest.raises(UserError, match="plain file name"):
            merge(primary_model_name="a", secondary_model_name="b", custom_name=bad)
    assert sorted(p.name for p in folders.root.rglob("*")) == before
    with pytest.raises(UserError, match="already exists") as info:
        merge(primary_model_name="a", secondary_model_name="b", custom_name="b")
    assert info.value.status == 409


def test_interrupt_leaves_no_file(folders, merge):
    for fmt in ("safetensors", "ckpt"):
        with pytest.raises(UserError, match="interrupted"):
            merge(Control(stop_after=5), primary_model_name="a", secondary_model_name="b", custom_name="stopped",
                  checkpoint_format=fmt)
        assert not [p for p in folders.ckpts.iterdir() if "stopped" in p.name]


# -- through the running server ------------------------------------------------------------------------------------
def test_api_merge_then_generate(server, api):
    import httpx
    ckpt_dir = server.data_dir / "models" / "Stable-diffusion"
    sources = [ckpt_dir / "merge-src-a.safetensors", ckpt_dir / "merge-src-b.safetensors"]
    created = []
    url = server.url + "/easel/v1/merge-checkpoints"
    try:
        for seed, path in zip((21, 22), sources):
            write_tiny_checkpoint(path, "sd1", seed=seed)
        assert api.post("/refresh-checkpoints").status_code == 200
        r = httpx.post(url, json={"primary_model_name": "merge-src-a", "secondary_model_name": "merge-src-b",
                                  "multiplier": 0.5, "custom_name": "api-merged"}, timeout=600)
        assert r.status_code == 200, r.text
        body = r.json()
        created.append(Path(body["path"]))
        assert body["name"] == "api-merged.safetensors" and body["title"].startswith("api-merged.safetensors [")
        assert Path(body["path"]).parent == ckpt_dir.resolve()
        titles = [m["title"] for m in api.get("/sd-models").json()]
        assert body["title"] in titles  # listed at once
        a, b, m = tensors(sources[0]), tensors(sources[1]), tensors(Path(body["path"]))
        key = "model.diffusion_model.out.2.weight"
        assert torch.allclose(m[key], (a[key] + b[key]) * 0.5, atol=1e-6)

        gen = api.post("/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                         "override_settings": {"sd_model_checkpoint": body["title"]}})
        assert gen.status_code == 200, gen.text
        assert "api-merged" in json.loads(gen.json()["info"])["infotexts"][0]

        # refusals answer 4xx in A1111's error shape and write nothing
        mixed = httpx.post(url, json={"primary_model_name": "merge-src-a", "secondary_model_name": "tiny-sdxl"})
        assert mixed.status_code == 400 and "different families" in mixed.json()["detail"]
        escape = httpx.post(url, json={"primary_model_name": "merge-src-a", "secondary_model_name": "merge-src-b",
                                       "custom_name": "../escaped"})
        assert escape.status_code == 400 and "plain file name" in escape.json()["detail"]
        assert not (ckpt_dir.parent / "escaped.safetensors").exists()
        again = httpx.post(url, json={"primary_model_name": "merge-src-a", "secondary_model_name": "merge-src-b",
                                      "custom_name": "api-merged"})
        assert again.status_code == 409
        missing = httpx.post(url, json={"primary_model_name": "no-such-model", "secondary_model_name": "merge-src-b"})
        assert missing.status_code == 404
    finally:
        for path in sources + created:
            path.unlink(missing_ok=True)
        api.post("/refresh-checkpoints")
