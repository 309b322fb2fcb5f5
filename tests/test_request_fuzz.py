"""A fuzz of the request models through the real server: wrong types, values out of range, NaN, +-Infinity, huge
numbers, huge strings, nested objects, null and lone surrogates, field by field. Every answer must be a 200 or a
4xx (never a 500), and the server must keep serving. Seeded and bounded, so a failure repeats."""
from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image

from backend.postprocess.schemas import ExtrasSingleImageRequest
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest

SEED = 20261201
PER_FIELD = 4  # random picks per field, besides the values every field gets

BIG_STRING = "a" * 300_000
NESTED = {"a": [1, {"b": [None, {"c": "d"}]}], "e": {"f": {}}}
DEEP = json.loads("[" * 200 + "]" * 200)
POOL = [
    "abc", "", " ", "\ud800", "x\udfffy", BIG_STRING, "(" * 5000, "[a:b:" + "9" * 400 + "]",
    0, 1, -1, -2, 7, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1, -(10**30),
    0.5, -0.5, 1e-300, 1e300, -1e300, float("nan"), float("inf"), float("-inf"),
    True, False, None, [], [1, "a", None], [float("nan")], ["\ud800"], {}, NESTED, DEEP,
]
ALWAYS = [float("nan"), float("inf"), float("-inf"), "\ud800", None, NESTED, 2**64]

# Structured values for the fields that carry structures of their own.
EXTRA_FOR = {
    "alwayson_scripts": [
        {"controlnet": "abc"}, {"controlnet": {"args": "abc"}}, {"controlnet": {"args": [None, 5, "x"]}},
        {"controlnet": {"args": [{"enabled": True, "weight": float("nan"), "image": "x"}]}},
        {"controlnet": {"args": [{"enabled": True, "module": 5, "model": [], "image": {"image": 3}}]}},
        {"controlnet": {"args": [{"enabled": True, "processor_res": 10**12, "guidance_start": "x", "image": ""}]}},
        {"soft inpainting": {"args": [float("inf")]}}, {"Soft Inpainting": "x"}, {"nope script": {"args": []}},
    ],
    "script_args": [[None, float("inf"), 1, "x"], [None, 10**30, "None", 2], [0, 0, 0, ["left"]],
                    [1e300, 1e300, 1e300, 1e300], ["", -5, "nope", float("nan")]],
    "script_name": ["SD upscale", "Poor man's outpainting", "outpainting mk2", "x/y/z plot", "nope"],
    # The container, and bad values of known settings (the settings gate answers them; test_settings_gate has more).
    "override_settings": [{"nonexistent_setting": [1, 2]}, {"nonexistent_setting": float("nan")},
                          {"CLIP_stop_at_last_layers": 10**30}, {"\ud800": 1}, {"eta_ancestral": "abc"},
                          {"show_progress_every_n_steps": "x"}, {"CLIP_stop_at_last_layers": 999},
                          {"samples_format": "png/../../x"}, {"eta_ancestral": float("nan")}, {"sd_model_checkpoint": 5},
                          {"sd_vae": ["x"]}, {"samples_save": {"a": 1}}, {"outdir_txt2img_samples": None}],
    "styles": [["nope"], [None], ["\ud800"]],
    "init_images": [["abc"], [""], [None], ["data:image/png;base64,!!!"], ["A" * 100_000], [[1]]],
    "mask": ["abc", "data:image/png;base64,AAAA", "A" * 10_001],
    "resize_mode": [3, 4, -1, "Just resize", "nope", 10**30],
    "sampler_name": ["Euler", "DPM adaptive", "nope", "Euler Karras"],
    "scheduler": ["Karras", "nope"],
    "hr_upscaler": ["Latent", "Lanczos", "nope"],
}


def _png_b64(size=(64, 64), color=(120, 80, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _txt2img_base() -> dict:
    return {"prompt": "a cat", "negative_prompt": "", "steps": 1, "width": 64, "height": 64, "seed": 1,
            "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, "hr_scale": 1.5, "hr_second_pass_steps": 1,
            "send_images": False, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}


def _img2img_base() -> dict:
    body = _txt2img_base()
    body.update({"init_images": [_png_b64()], "denoising_strength": 0.5})
    return body


def _post(client, path: str, body) -> int:
    """POST `body` encoded by Python's own JSON writer, which writes NaN and Infinity as JS literals and lone
    surrogates as \\ud800 escapes, as a hostile client may."""
    data = json.dumps(body, allow_nan=True)
    return client.post(path, content=data, headers={"Content-Type": "application/json"}).status_code


def _cases(fields, rng: random.Random):
    for name in fields:
        values = list(ALWAYS) + rng.sample(POOL, PER_FIELD) + EXTRA_FOR.get(name, [])
        for value in values:
            yield name, value


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _fuzz(api, path: str, base: dict, fields, rng: random.Random) -> list[str]:
    failures = []
    for name, value in _cases(fields, rng):
        body = dict(base)
        body[name] = value
        status = _post(api, path, body)
        if status >= 500:
            failures.append(f"{path} {name}={_describe(value)} -> {status}")
    return failures


def _still_serving(api) -> None:
    assert api.get("/samplers").status_code == 200
    r = api.post("/txt2img", json=_txt2img_base())
    assert r.status_code == 200, r.text


def test_txt2img_fields_never_500(api):
    rng = random.Random(SEED)
    failures = _fuzz(api, "/txt2img", _txt2img_base(), sorted(Txt2ImgRequest.model_fields), rng)
    assert not failures, "\n".join(failures)
    _still_serving(api)


def test_img2img_fields_never_500(api):
    rng = random.Random(SEED + 1)
    own = [f for f in Img2ImgRequest.model_fields if f not in Txt2ImgRequest.model_fields or f == "denoising_strength"]
    # the shared fields once more, with other random picks, through img2img's own checks
    shared = rng.sample(sorted(Txt2ImgRequest.model_fields), 15)
    failures = _fuzz(api, "/img2img", _img2img_base(), sorted(own) + shared, rng)
    assert not failures, "\n".join(failures)
    _still_serving(api)


def test_whole_bodies_of_the_wrong_shape_never_500(api):
    failures = []
    for path in ("/txt2img", "/img2img", "/png-info", "/extra-single-image", "/options"):
        for body in ([], "abc", 5, None, float("nan"), DEEP, {"\ud800": 1}, [_txt2img_base()]):
            status = _post(api, path, body)
            if status >= 500:
                failures.append(f"{path} body={_describe(body)} -> {status}")
        status = api.post(path, content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        if status >= 500:
            failures.append(f"{path} malformed JSON -> {status}")
    assert not failures, "\n".join(failures)
    _still_serving(api)


def test_options_values_never_500_and_are_not_stored_when_refused(api):
    from backend.core.options import SETTINGS

    rng = random.Random(SEED + 2)
    before = api.get("/options").json()
    models = {"sd_model_checkpoint", "sd_vae"}  # only values that name no model: a valid one would load it
    keys = [s.key for s in SETTINGS]
    failures = []
    try:
        for key in keys:
            for value in list(ALWAYS) + ([] if key in models else rng.sample(POOL, PER_FIELD)):
                status = _post(api, "/options", {key: value})
                if status >= 500:
                    failures.append(f"/options {key}={_describe(value)} -> {status}")
        for value in (float("nan"), "\ud800", [float("inf")], {"k": "\udc00"}):
            status = _post(api, "/options", {"some_extension_setting": value})
            if status >= 500:
                failures.append(f"/options some_extension_setting={_describe(value)} -> {status}")
            else:
                assert status >= 400, f"{value!r} was stored"
        after = api.get("/options")
        assert after.status_code == 200  # what is stored is still valid JSON
        for key in ("eta_ancestral", "eta_ddim", "code_former_weight"):
            value = after.json()[key]
            assert isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
    finally:
        restore = {k: before[k] for k in keys if k in before}
        assert api.post("/options", json=restore).status_code == 200
    assert not failures, "\n".join(failures)
    _still_serving(api)


def test_png_info_and_extras_single_image_never_500(api):
    rng = random.Random(SEED + 3)
    failures = []
    for value in list(ALWAYS) + rng.sample(POOL, 8) + ["data:image/png;base64," + _png_b64(), "A" * 100_001]:
        status = _post(api, "/png-info", {"image": value})
        if status >= 500:
            failures.append(f"/png-info image={_describe(value)} -> {status}")
    base = {"image": _png_b64((32, 32)), "upscaler_1": "None"}
    failures += _fuzz(api, "/extra-single-image", base, sorted(ExtrasSingleImageRequest.model_fields), rng)
    assert not failures, "\n".join(failures)
    _still_serving(api)


@pytest.mark.parametrize("field,value", [
    ("seed", 2**63), ("seed", 2**64), ("seed", 10**30), ("subseed", 2**63), ("subseed", 2**64 + 5),
    ("seed", 2**63 - 1 - 2),  # 2^63 - 1 is the largest seed; a job of 4 images would pass it
])
def test_huge_seeds_are_a_clear_4xx(api, field, value):
    r = api.post("/txt2img", content=json.dumps(dict(_txt2img_base(), batch_size=2, n_iter=2, **{field: value})),
                 headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["detail"] and "2^63" in r.json()["detail"]


def test_largest_allowed_seed_and_negative_seeds_work(api):
    for seed in (2**63 - 1, -1, -2, -(2**63)):
        r = api.post("/txt2img", json=dict(_txt2img_base(), seed=seed))
        assert r.status_code == 200, (seed, r.text)
        info = json.loads(r.json()["info"])
        assert info["seed"] == seed if seed >= 0 else 0 <= info["seed"] < 2**32


@pytest.mark.parametrize("field", ["hr_scale", "cfg_scale", "denoising_strength", "subseed_strength", "s_churn",
                                   "s_noise", "eta", "refiner_switch_at"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_a_4xx_naming_the_field(api, field, value):
    r = api.post("/txt2img", content=json.dumps(dict(_txt2img_base(), enable_hr=True, **{field: value})),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"] and "finite" in r.json()["detail"]


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "hr_prompt", "sampler_name", "styles"])
def test_lone_surrogates_are_a_4xx_naming_the_field(api, field):
    value = ["a \ud800 cat"] if field == "styles" else "a \ud800 cat"
    body = json.dumps(dict(_txt2img_base(), **{field: value}))  # written as the escape \ud800, as JSON allows
    assert "\\ud800" in body
    r = api.post("/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"] and "surrogate" in r.json()["detail"]
