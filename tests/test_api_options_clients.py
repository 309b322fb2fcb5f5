"""The options AUTOMATIC1111 clients read and set, through the real server and backend process: the checkpoint in
use by its sd-models title with its hash, samples_format jpg/webp for saved files and the API's images (infotext
in EXIF, read back by PNG Info and by A1111's own reader, piexif), save_txt, grid_format, the infotext switches,
unknown keys stored and returned; and, without a server, upscaler_for_img2img and
sd_vae_overrides_per_model_preferences."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image

SD1 = "tiny-sd1.safetensors"


def small(**kw) -> dict:
    body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 7, "seed": 1234, "override_settings": {"sd_model_checkpoint": SD1}}
    body.update(kw)
    return body


def generate(api, **kw) -> tuple[list[bytes], dict]:
    r = api.post("/txt2img", json=small(**kw))
    assert r.status_code == 200, r.text
    return [base64.b64decode(b) for b in r.json()["images"]], json.loads(r.json()["info"])


def exif_comment(data: bytes) -> str:
    """The infotext as AUTOMATIC1111's `read_info_from_image` reads a jpg/webp: piexif, EXIF UserComment."""
    exif = piexif.load(Image.open(io.BytesIO(data)).info["exif"])
    return piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])


def config(server) -> dict:
    path = server.data_dir / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def saved_files(server, folder: str, seed: int, ext: str) -> list[Path]:
    return sorted((server.data_dir / "outputs" / folder).rglob(f"*-{seed}.{ext}"))


@pytest.fixture()
def options(api):
    """Set options for one test; the ones it changed are put back afterwards (the server is shared)."""
    before = api.get("/options").json()
    changed: list[str] = []

    def set_options(**values):
        changed.extend(values)
        r = api.post("/options", json=values)
        assert r.status_code == 200, r.text

    yield set_options
    if changed:
        assert api.post("/options", json={k: before[k] for k in changed if k in before}).status_code == 200


def test_options_name_the_checkpoint_by_its_title_with_hash(api, server):
    deadline = time.monotonic() + 120  # hashed by the app at start (tiny files: at once)
    while True:
        opts = api.get("/options").json()
        if opts["sd_checkpoint_hash"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    models = {m["title"]: m for m in api.get("/sd-models").json()}
    title = opts["sd_model_checkpoint"]
    assert title in models, (title, list(models))
    sha256 = hashlib.sha256(Path(models[title]["filename"]).read_bytes()).hexdigest()
    assert opts["sd_checkpoint_hash"] == sha256
    assert title.endswith(f" [{sha256[:10]}]") and models[title]["sha256"] == sha256
    assert models[title]["hash"] == sha256[:10]

    # a client posting the whole dict back changes nothing: the reported title is not stored as a choice
    stored = config(server).get("sd_model_checkpoint", "")
    assert api.post("/options", json=opts).status_code == 200
    after = config(server)
    assert after.get("sd_model_checkpoint", "") == stored and "sd_checkpoint_hash" not in after

    # a generation's info names its checkpoint by one of the titles, which then carries the hash
    _, info = generate(api, seed=71)
    titles = [m["title"] for m in api.get("/sd-models").json()]
    assert info["sd_model_checkpoint"] in titles
    assert info["sd_model_checkpoint"] == f"{SD1} [{info['sd_model_hash']}]"


def test_jpg_samples_saved_and_returned_with_the_infotext_in_exif(api, server, options):
    options(samples_format="jpg", jpeg_quality=90, save_txt=True)
    seed = 880011
    images, info = generate(api, seed=seed, batch_size=2, save_images=True)
    grid, first = images[0], images[1]  # the grid first, as A1111's answer
    for data in images:
        assert Image.open(io.BytesIO(data)).format == "JPEG"
    infotext = info["infotexts"][1]
    assert exif_comment(first) == infotext and "Model hash: " in infotext

    saved = saved_files(server, "txt2img-images", seed, "jpg")
    assert len(saved) == 1 and Image.open(saved[0]).format == "JPEG"
    assert exif_comment(saved[0].read_bytes()) == infotext
    assert saved[0].with_suffix(".txt").read_text(encoding="utf-8") == infotext + "\n"  # save_txt
    # grid_format stays png: the grid file is a PNG with its infotext chunk
    grids = sorted((server.data_dir / "outputs" / "txt2img-grids").rglob(f"*grid-{seed}.png"))
    assert len(grids) == 1 and Image.open(grids[0]).info["parameters"] == info["infotexts"][0]

    # PNG Info reads the infotext back from the jpg's EXIF
    r = api.post("/png-info", json={"image": base64.b64encode(saved[0].read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == infotext and str(r.json()["parameters"]["Seed"]) == str(seed)


def test_webp_lossless_keeps_the_pixels_and_jpeg_quality_changes_the_size(api, server, options):
    png, _ = generate(api, seed=5150)
    assert Image.open(io.BytesIO(png[0])).format == "PNG"
    options(samples_format="webp", webp_lossless=True, save_txt=False)
    webp, info = generate(api, seed=5150, save_images=True)
    picture = Image.open(io.BytesIO(webp[0]))
    assert picture.format == "WEBP" and exif_comment(webp[0]) == info["infotexts"][0]
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(Image.open(io.BytesIO(png[0])).convert("RGB")))
    saved = saved_files(server, "txt2img-images", 5150, "webp")
    assert len(saved) == 1 and exif_comment(saved[0].read_bytes()) == info["infotexts"][0]
    assert not saved[0].with_suffix(".txt").exists()  # save_txt off

    # lossy webp with the quality of jpeg_quality, and the job's own override of the format
    low, _ = generate(api, seed=5150, override_settings={"sd_model_checkpoint": SD1, "webp_lossless": False,
                                                         "jpeg_quality": 5})
    high, _ = generate(api, seed=5150, override_settings={"sd_model_checkpoint": SD1, "webp_lossless": False,
                                                          "jpeg_quality": 100})
    assert Image.open(io.BytesIO(low[0])).format == "WEBP" and len(low[0]) < len(high[0])
    jpg, _ = generate(api, seed=5150, override_settings={"sd_model_checkpoint": SD1, "samples_format": "jpg"})
    assert Image.open(io.BytesIO(jpg[0])).format == "JPEG"


def test_model_hash_and_name_in_the_infotext_follow_their_settings(api):
    _, info = generate(api, seed=3)
    assert "Model hash: " in info["infotexts"][0] and ", Model: tiny-sd1," in info["infotexts"][0]
    _, info = generate(api, seed=3, override_settings={"sd_model_checkpoint": SD1, "add_model_hash_to_info": False})
    assert "Model hash:" not in info["infotexts"][0] and ", Model: tiny-sd1," in info["infotexts"][0]
    _, info = generate(api, seed=3, override_settings={"sd_model_checkpoint": SD1, "add_model_name_to_info": False})
    assert "Model hash: " in info["infotexts"][0] and "Model:" not in info["infotexts"][0].replace("Model hash:", "")


def test_unknown_keys_are_stored_returned_and_logged(api, server):
    value = {"nested": [1, "two", None], "flag": True}
    r = api.post("/options", json={"my_client_tool_setting": value})
    assert r.status_code == 200, r.text
    assert api.get("/options").json()["my_client_tool_setting"] == value
    assert config(server)["my_client_tool_setting"] == value
    deadline = time.monotonic() + 30
    while "'my_client_tool_setting'" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no warning names the unknown key"
        time.sleep(0.2)
    line = next(x for x in server.log_path.read_text(errors="replace").splitlines() if "'my_client_tool_setting'" in x)
    assert "unknown" in line
    # the gate's rules still hold for them: no NaN, no lone surrogates
    r = api.post("/options", content=b'{"my_client_tool_setting": NaN}', headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422)
    assert api.get("/options").json()["my_client_tool_setting"] == value


def test_upscaler_for_img2img_enlarges_a_smaller_init_image():
    from backend.engine.pipelines.img2img import resize_init_image

    checker = Image.fromarray((np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)).convert("RGB")

    def colours(name: str, mode: int = 0) -> int:
        ctx = SimpleNamespace(options={"upscaler_for_img2img": name}, warnings=[], postprocess=None)
        out = resize_init_image(ctx, mode, checker, 32, 32)
        assert out.size == (32, 32)
        return len(np.unique(np.asarray(out).reshape(-1, 3), axis=0))

    assert colours("Nearest") == 2  # the upscaler made the picture: blocks of the two colours
    assert colours("None") > 2  # a Lanczos resize blends them
    assert colours("") > 2  # A1111's default (null)
    assert colours("Nearest", mode=1) == 2 and colours("Nearest", mode=2) == 2


def test_vae_preference_of_a_checkpoint_and_the_setting_that_overrides_it(tmp_path):
    from backend.checkpoints import HashCache, ModelRegistry

    ckpts, vaes = tmp_path / "Stable-diffusion", tmp_path / "VAE"
    ckpts.mkdir()
    vaes.mkdir()
    for path in (ckpts / "a.safetensors", ckpts / "b.safetensors", vaes / "v1.safetensors", vaes / "v2.safetensors"):
        path.write_bytes(b"x")
    (ckpts / "a.json").write_text(json.dumps({"description": "", "vae": "v2.safetensors"}), encoding="utf-8")
    registry = ModelRegistry([ckpts], [vaes], HashCache(tmp_path / "hashes.json"))
    a, b = registry.find_checkpoint("a"), registry.find_checkpoint("b")
    v1, v2 = (vaes / "v1.safetensors").resolve(), (vaes / "v2.safetensors").resolve()

    assert registry.vae_for(a, "Automatic") == v2  # the checkpoint's preference
    assert registry.vae_for(a, "v1.safetensors") == v1  # the setting overrides it (A1111's default: True)
    assert registry.vae_for(a, "v1.safetensors", settings_override_preferences=False) == v2
    assert registry.vae_for(b, "v1.safetensors", settings_override_preferences=False) == v1  # b prefers none
    assert registry.vae_for(b, "Automatic") is None
    (ckpts / "a.json").write_text(json.dumps({"vae": "None"}), encoding="utf-8")
    assert registry.vae_for(a, "v1.safetensors", settings_override_preferences=False) is None


def test_settings_for_unset_request_fields_and_the_version_switch(api):
    _, info = generate(api, seed=8)
    assert "Tiling:" not in info["infotexts"][0] and "Version: " in info["infotexts"][0]
    # tiling left unset takes the setting `tiling` (A1111's); an explicit false wins over it
    _, info = generate(api, seed=8, override_settings={"sd_model_checkpoint": SD1, "tiling": True,
                                                       "add_version_to_infotext": False})
    assert "Tiling: True" in info["infotexts"][0] and "Version:" not in info["infotexts"][0]
    _, info = generate(api, seed=8, tiling=False, override_settings={"sd_model_checkpoint": SD1, "tiling": True})
    assert "Tiling:" not in info["infotexts"][0]
