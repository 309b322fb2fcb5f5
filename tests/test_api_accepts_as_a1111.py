"""Issue 14: what AUTOMATIC1111's API accepts, Easel accepts, through the running server: prompts with unbalanced
brackets (read as A1111 reads them), sizes that are not multiples of 8 (the latent's size is floored, as A1111's),
steps above the UI's slider. These requests were refused (400) before; the tests that asserted the refusals now
assert the acceptance."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from backend.core.infotext import parse_infotext
from backend.core.request_checks import MAX_STEPS

SD1 = "tiny-sd1.safetensors"


def small(**kw) -> dict:
    body = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 7, "seed": 4321, "override_settings": {"sd_model_checkpoint": SD1}}
    body.update(kw)
    return body


def images_of(resp) -> list[Image.Image]:
    assert resp.status_code == 200, resp.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in resp.json()["images"]]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- unbalanced brackets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["smiling girl :)", "a cat)", "(masterpiece, best quality", "(red hair:1.2",
                                  "[low quality", "a [cat:dog:1] (x"])
def test_unbalanced_brackets_are_accepted(api, field, text):
    r = api.post("/txt2img", json=small(**{field: text}, steps=1))
    assert len(images_of(r)) == 1
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    params = parse_infotext(infotext)
    assert params["Prompt" if field == "prompt" else "Negative prompt"] == text  # kept as written


def test_unbalanced_brackets_are_read_as_a1111_reads_them(api):
    def image(prompt: str) -> np.ndarray:
        return pixels(images_of(api.post("/txt2img", json=small(prompt=prompt)))[0])

    # an unclosed "(" weighs the rest by 1.1: the same conditioning as the closed bracket
    unclosed, closed = image("(masterpiece, best quality"), image("(masterpiece, best quality)")
    assert np.array_equal(unclosed, closed)
    assert not np.array_equal(unclosed, image("masterpiece, best quality"))  # the weight matters
    # a stray ")" is text: the same as the escaped, literal ")"
    assert np.array_equal(image("a cat)"), image("a cat\\)"))
    # "(red hair:1.2" without ")": ":1.2" is text, the rest weighs 1.1 - not the weight 1.2
    assert not np.array_equal(image("(red hair:1.2"), image("(red hair:1.2)"))


def test_unbalanced_brackets_are_accepted_in_img2img_and_hires_prompts(api):
    init = Image.new("RGB", (64, 64), (200, 60, 30))
    r = api.post("/img2img", json=small(init_images=[b64(init)], prompt="a cat)", negative_prompt="(ugly",
                                        denoising_strength=0.5))
    assert len(images_of(r)) == 1
    r = api.post("/txt2img", json=small(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5,
                                        hr_prompt="(sharp details", hr_negative_prompt="blurry)"))
    assert images_of(r)[0].size == (96, 96)


# -- sizes that are not multiples of 8, steps above the slider -------------------------------------------------

def test_size_not_a_multiple_of_8_makes_the_floored_latent_size(api):
    r = api.post("/txt2img", json=small(width=70, height=77))
    img = images_of(r)[0]
    assert img.size == (64, 72)  # A1111: latent 70 // 8 x 77 // 8, decoded x 8
    assert str(parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["Size-1"]) == "64"
    assert r.json()["parameters"]["width"] == 70  # the request, echoed as sent


def test_img2img_with_the_source_pictures_odd_size(api):
    # clients send the source picture's size: 101 x 75 makes 96 x 72
    init = Image.new("RGB", (101, 75), (30, 90, 200))
    r = api.post("/img2img", json=small(init_images=[b64(init)], width=101, height=75, denoising_strength=0.5))
    assert images_of(r)[0].size == (96, 72)
    # with a mask (inpainting the whole picture): the mask is resized the same way
    mask = Image.new("L", (101, 75), 0)
    mask.paste(255, (20, 20, 60, 60))
    r = api.post("/img2img", json=small(init_images=[b64(init)], mask=b64(mask), width=101, height=75,
                                        denoising_strength=0.5, inpaint_full_res=False))
    assert images_of(r)[0].size == (96, 72)
    # "only masked" (the API's default) pastes the region back into the source picture, at its own size
    r = api.post("/img2img", json=small(init_images=[b64(init)], mask=b64(mask), width=101, height=75,
                                        denoising_strength=0.5))
    assert images_of(r)[0].size == (101, 75)


def test_steps_above_the_ui_slider_are_accepted(api):
    r = api.post("/txt2img", json=small(steps=151, width=64, height=64))
    assert len(images_of(r)) == 1
    assert str(parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["Steps"]) == "151"
    # the safety cap names itself
    r = api.post("/txt2img", json=small(steps=MAX_STEPS + 1))
    assert r.status_code == 400 and f"between 1 and {MAX_STEPS}" in r.json()["detail"]
    r = api.post("/txt2img", json=small(enable_hr=True, hr_second_pass_steps=MAX_STEPS + 1))
    assert r.status_code == 400 and "hr_second_pass_steps" in r.json()["detail"]


def test_hires_steps_above_the_ui_slider_pass_the_checks():
    from backend.core.request_checks import check_txt2img
    from backend.core.schemas import Txt2ImgRequest

    check_txt2img(Txt2ImgRequest(prompt="x", enable_hr=True, hr_second_pass_steps=500, steps=400))  # no error
