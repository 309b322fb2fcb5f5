"""The post-processing API through the real server and backend process: lists, extra-single-image,
extra-batch-images, face restoration, errors, and the upscalers / Restore faces in txt2img."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from postprocess_factory import link_models, write_test_models

HAAR = "OpenCV Haar cascade"


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unb64(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


def photo(width: int = 50, height: int = 30) -> Image.Image:
    import skimage.data
    return Image.fromarray(skimage.data.astronaut()).crop((150, 40, 150 + width, 40 + height))


@pytest.fixture(scope="module")
def pp_models(server, tmp_path_factory):
    files = write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models")
    link_models(files, server.data_dir / "models")
    return files


@pytest.fixture()
def papi(api, pp_models):
    """The API with the post-processing model files in the server's models/ and the offline face detector."""
    assert api.post("/options", json={"face_detector": HAAR}).status_code == 200
    return api


def test_lists(papi, pp_models):
    ups = papi.get("/upscalers").json()
    names = [u["name"] for u in ups]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    for name in ("R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "4x-Tiny", "R-ESRGAN 4x+ Anime6B"):
        assert name in names
    entry = next(u for u in ups if u["name"] == "4x-Tiny")
    assert entry["model_name"] == "ESRGAN" and entry["model_path"].endswith("4x-Tiny.safetensors") and entry["scale"] == 4
    assert set(entry) == {"name", "model_name", "model_path", "model_url", "scale"}
    restorers = papi.get("/face-restorers").json()
    assert [r["name"] for r in restorers] == ["CodeFormer", "GFPGAN"]
    assert restorers[1]["cmd_dir"].endswith("GFPGAN")
    real = {m["name"]: m for m in papi.get("/realesrgan-models").json()}
    assert real["R-ESRGAN 4x+"]["path"].endswith("RealESRGAN_x4plus.pth") and real["R-ESRGAN 4x+"]["scale"] == 4
    assert real["R-ESRGAN 4x+ Anime6B"]["path"].startswith("https://")


def test_single_image_upscale_has_the_exact_size_and_records_the_steps(papi, server):
    before = set((server.data_dir / "outputs").rglob("*.png"))
    r = papi.post("/extra-single-image", json={"image": b64(photo(50, 30)), "upscaler_1": "R-ESRGAN 4x+",
                                                "upscaling_resize": 4})
    assert r.status_code == 200, r.text
    out = unb64(r.json()["image"])
    assert out.size == (200, 120)
    steps = "Postprocess upscale by: 4, Postprocess upscaler: R-ESRGAN 4x+"
    assert out.info["parameters"] == steps and out.info["extras"] == steps
    assert steps in r.json()["html_info"]
    assert set((server.data_dir / "outputs").rglob("*.png")) == before  # the API does not save, as A1111


def test_scale_to_with_crop_and_a_second_upscaler(papi):
    body = {"image": b64(photo(50, 30)), "resize_mode": 1, "upscaling_resize_w": 120, "upscaling_resize_h": 40,
            "upscaling_crop": True, "upscaler_1": "4x-Tiny", "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}
    r = papi.post("/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    out = unb64(r.json()["image"])
    assert out.size == (120, 40)
    text = out.info["parameters"]
    for item in ("Postprocess upscale to: 120x40", "Postprocess upscaler: 4x-Tiny", "Postprocess upscaler 2: Lanczos",
                 "Postprocess crop to: 120x40"):
        assert item in text
    r = papi.post("/extra-single-image", json={**body, "upscaling_crop": False, "extras_upscaler_2_visibility": 0})
    assert unb64(r.json()["image"]).size == (120, 72)  # scaled to cover 120x40, not cropped


def test_batch_images_with_alpha_grayscale_and_16_bit(papi):
    rgba = photo(40, 20).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 20)))
    gray16 = Image.fromarray(np.asarray(photo(30, 30).convert("L"), dtype="<u2") * 257)
    body = {"imageList": [{"data": b64(rgba), "name": "a.png"}, {"data": b64(gray16), "name": "b.png"},
                          {"data": b64(photo(10, 10)), "name": "c.png"}],
            "upscaler_1": "R-ESRGAN General 4xV3", "upscaling_resize": 2}
    r = papi.post("/extra-batch-images", json=body)
    assert r.status_code == 200, r.text
    a, b, c = (unb64(x) for x in r.json()["images"])
    assert a.size == (80, 40) and a.mode == "RGBA"
    assert np.asarray(a.getchannel("A")).std() > 30  # the gradient alpha survived
    assert b.size == (60, 60) and b.mode == "L" and np.asarray(b).max() > 150
    assert c.size == (20, 20)


def test_face_restoration_changes_only_the_face(papi):
    import skimage.data
    source = Image.fromarray(skimage.data.astronaut())
    r = papi.post("/extra-single-image", json={"image": b64(source), "gfpgan_visibility": 1})
    assert r.status_code == 200, r.text
    out = unb64(r.json()["image"])
    assert out.info["parameters"] == "GFPGAN visibility: 1"
    out = out.convert("RGB")
    changed = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(source, dtype=np.int16)).max(axis=2) > 0
    assert changed[110:140, 190:260].mean() > 0.9  # her face
    assert not changed[300:].any() and not changed[:, :120].any() and not changed[:, 360:].any()


def test_image_without_a_face_is_returned_unchanged_with_a_note(papi):
    ramp = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    r = papi.post("/extra-single-image", json={"image": b64(ramp), "codeformer_visibility": 1, "codeformer_weight": 0.3})
    assert r.status_code == 200, r.text
    assert "No face was found" in r.json()["html_info"]
    assert np.array_equal(np.asarray(unb64(r.json()["image"]).convert("RGB")), np.asarray(ramp))


def test_errors_are_clear(papi, server):
    r = papi.post("/extra-single-image", json={"image": b64(photo()), "upscaler_1": "Magic"})
    assert r.status_code == 400 and "Unknown upscaler 'Magic'" in r.json()["detail"]
    r = papi.post("/extra-single-image", json={"image": b64(photo()), "upscaling_resize": 20})
    assert r.status_code == 422 and r.json()["error"] == "RequestValidationError"
    r = papi.post("/extra-single-image", json={"image": "not base64!", "upscaler_1": "Lanczos"})
    assert r.status_code == 400 and "image" in r.json()["detail"]
    broken = server.data_dir / "models" / "ESRGAN" / "4x_broken.pth"
    broken.write_bytes(b"\x00garbage" * 100)
    try:
        r = papi.post("/extra-single-image", json={"image": b64(photo()), "upscaler_1": "4x_broken"})
        assert r.status_code == 400 and "4x_broken.pth" in r.json()["detail"]
    finally:
        broken.unlink()
    big = Image.new("RGB", (2100, 1100))
    r = papi.post("/extra-single-image", json={"image": b64(big), "upscaler_1": "Lanczos", "upscaling_resize": 8})
    assert r.status_code == 413 and "16384" in r.json()["detail"]


def _small(**kw) -> dict:
    return {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler", **kw}


def test_txt2img_restore_faces_records_the_restorer(papi):
    r = papi.post("/txt2img", json=_small(restore_faces=True))
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Face restoration: CodeFormer" in info["infotexts"][0] and info["restore_faces"] is True
    r = papi.post("/txt2img", json=_small(restore_faces=True, override_settings={"face_restoration_model": "GFPGAN"}))
    assert "Face restoration: GFPGAN" in json.loads(r.json()["info"])["infotexts"][0]


def test_img2img_restore_faces_records_the_restorer(papi):
    r = papi.post("/img2img", json=_small(restore_faces=True, denoising_strength=0.5, init_images=[b64(photo(64, 64))],
                                          override_settings={"face_restoration_model": "GFPGAN"}))
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Face restoration: GFPGAN" in info["infotexts"][0] and info["restore_faces"] is True
    assert unb64(r.json()["images"][0]).size == (64, 64)


def test_hires_fix_with_a_model_upscaler(papi):
    r = papi.post("/txt2img", json=_small(enable_hr=True, hr_scale=2, hr_upscaler="R-ESRGAN General 4xV3",
                                          hr_second_pass_steps=1, denoising_strength=0.3))
    assert r.status_code == 200, r.text
    img = unb64(r.json()["images"][0])
    assert img.size == (128, 128)
    assert "Hires upscaler: R-ESRGAN General 4xV3" in img.info["parameters"]
    r = papi.post("/txt2img", json=_small(enable_hr=True, hr_upscaler="Magic"))
    assert r.status_code == 400 and "Unknown hires upscaler 'Magic'" in r.json()["detail"]
