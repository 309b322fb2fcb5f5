"""Issue 14: the `infotext` request field (AUTOMATIC1111 1.7+) fills the fields the request leaves out, through the
running server's API; a field the request gives itself wins, as in A1111's `apply_infotext`."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from backend.core.infotext import parse_infotext
from backend.core.infotext_request import infotext_settings, request_fields
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest

SD1 = "tiny-sd1.safetensors"
INFOTEXT = ("a red boat on a lake\nNegative prompt: blurry, dark\n"
            "Steps: 3, Sampler: Euler, Schedule type: Karras, CFG scale: 5.5, Seed: 991, Size: 64x72, Model: tiny-sd1, "
            "Clip skip: 2, Version: v1.10.1")


def answer(resp) -> tuple[list[Image.Image], dict]:
    assert resp.status_code == 200, resp.text
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in resp.json()["images"]]
    return images, json.loads(resp.json()["info"])


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_request_fields_from_an_infotext():
    params = parse_infotext(INFOTEXT + ", Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.4")
    fields = request_fields(params, Txt2ImgRequest, img2img=False)
    assert fields["prompt"] == "a red boat on a lake" and fields["negative_prompt"] == "blurry, dark"
    assert (fields["steps"], fields["sampler_name"], fields["scheduler"], fields["cfg_scale"], fields["seed"]) == \
        (3, "Euler", "karras", 5.5, 991)
    assert (fields["width"], fields["height"], fields["enable_hr"], fields["hr_scale"]) == (64, 72, True, 2.0)
    # img2img: a paste there fills no hires. fix fields
    fields = request_fields(params, Img2ImgRequest, img2img=True)
    assert "enable_hr" not in fields and "hr_scale" not in fields and fields["denoising_strength"] == 0.4
    assert infotext_settings(params)["CLIP_stop_at_last_layers"] == "2"


def test_an_infotext_alone_fills_the_request(api):
    images, info = answer(api.post("/txt2img", json={"infotext": INFOTEXT}))
    assert images[0].size == (64, 72)
    assert info["all_seeds"] == [991] and info["all_prompts"] == ["a red boat on a lake"]
    params = parse_infotext(info["infotexts"][0])
    assert params["Prompt"] == "a red boat on a lake" and params["Negative prompt"] == "blurry, dark"
    assert (str(params["Steps"]), params["Sampler"], params["Schedule type"], str(params["CFG scale"])) == \
        ("3", "Euler", "Karras", "5.5")
    assert str(params["Clip skip"]) == "2"  # a setting the infotext records joins override_settings
    assert params["Model"] == "tiny-sd1"
    # the same picture as the request that gives those fields itself
    same, _ = answer(api.post("/txt2img", json={
        "prompt": "a red boat on a lake", "negative_prompt": "blurry, dark", "steps": 3, "sampler_name": "Euler",
        "scheduler": "karras", "cfg_scale": 5.5, "seed": 991, "width": 64, "height": 72,
        "override_settings": {"sd_model_checkpoint": SD1, "CLIP_stop_at_last_layers": 2}}))
    assert np.array_equal(np.asarray(images[0]), np.asarray(same[0]))


def test_a_field_the_request_gives_wins(api):
    images, info = answer(api.post("/txt2img", json={"infotext": INFOTEXT, "seed": 5, "steps": 2, "width": 64,
                                                     "prompt": "a green tree",
                                                     "override_settings": {"CLIP_stop_at_last_layers": 1}}))
    params = parse_infotext(info["infotexts"][0])
    assert info["all_seeds"] == [5] and params["Prompt"] == "a green tree" and str(params["Steps"]) == "2"
    assert images[0].size == (64, 72)  # the height still from the infotext
    assert params["Negative prompt"] == "blurry, dark" and str(params["CFG scale"]) == "5.5"
    assert str(params["Clip skip"]) == "1"  # the request's own override wins


def test_infotext_hires_and_img2img(api):
    hires = INFOTEXT + ", Hires upscale: 1.5, Hires upscaler: Latent, Hires steps: 2, Denoising strength: 0.5"
    images, info = answer(api.post("/txt2img", json={"infotext": hires, "steps": 2}))
    assert images[0].size == (96, 104)  # 64x72 x 1.5, the latent floored: 96x104
    assert parse_infotext(info["infotexts"][0])["Hires upscale"] == "1.5"
    # img2img takes the prompt, seed and denoising strength, no hires. fix
    init = Image.new("RGB", (64, 72), (200, 40, 40))
    images, info = answer(api.post("/img2img", json={"infotext": hires, "init_images": [b64(init)], "steps": 2}))
    params = parse_infotext(info["infotexts"][0])
    assert images[0].size == (64, 72) and info["all_seeds"] == [991]
    assert str(params["Denoising strength"]) == "0.5" and "Hires upscale" not in params


def test_a_checkpoint_that_is_not_here_is_a_warning_not_a_failure(api):
    text = INFOTEXT.replace("Model: tiny-sd1", "Model hash: 0123456789, Model: not-here")
    images, info = answer(api.post("/txt2img", json={"infotext": text, "steps": 1,
                                                     "override_settings": {"sd_model_checkpoint": SD1}}))
    assert len(images) == 1  # the request's own checkpoint override: no lookup at all
    images, info = answer(api.post("/txt2img", json={"infotext": text, "steps": 1}))
    assert any("not-here [0123456789]" in w and "not in the checkpoint folders" in w for w in info["warnings"]), \
        info.get("warnings")


def test_an_overlong_parameters_line_is_refused_at_once(api):
    from backend.request_infotext import MAX_PARAMS_LINE

    r = api.post("/txt2img", json={"infotext": "a" * 300_000})  # A1111's pattern would take hours on it
    assert r.status_code == 413 and f"the limit is {MAX_PARAMS_LINE}" in r.json()["detail"]
