"""The refiner (refiner_checkpoint + refiner_switch_at), hires. fix with another checkpoint (hr_checkpoint_name) and
hires. fix from a given first-pass picture (firstpass_image), through the running server's API, as AUTOMATIC1111
1.6+/1.7+ takes them."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.core.infotext import infotext_to_request_fields, parse_infotext

MAIN = "tiny-sd1.safetensors"
REFINER = "zz-refiner-sd1.safetensors"  # another SD 1.x checkpoint (other weights): any pair works, as in A1111
XL_REFINER = "zz-sdxl-refiner.safetensors"  # an SDXL refiner: OpenCLIP-G only, aesthetic-score conditioning


@pytest.fixture(scope="module")
def refiner_server(tmp_path_factory, tiny_models):
    from conftest import Server
    from model_factory import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("refiner-models")
    second = folder / REFINER
    write_tiny_checkpoint(second, "sd1", seed=7)
    xl_refiner = folder / XL_REFINER
    write_tiny_checkpoint(xl_refiner, "sdxl_refiner", seed=8)  # the real single-file layout of the SDXL refiner
    models = {"sd1": tiny_models["sd1"], "refiner": second, "sdxl": tiny_models["sdxl"], "xl_refiner": xl_refiner}
    with Server(tmp_path_factory.mktemp("refiner-data"), models=models) as srv:
        yield srv


@pytest.fixture()
def rapi(refiner_server):
    with httpx.Client(base_url=refiner_server.url + "/sdapi/v1", timeout=600) as client:
        yield client


def body(**kw) -> dict:
    out = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64,
           "sampler_name": "DPM++ 2M", "cfg_scale": 7, "seed": 99, "override_settings": {"sd_model_checkpoint": MAIN}}
    out.update(kw)
    return out


def generate(api, route: str = "/txt2img", **kw) -> tuple[np.ndarray, dict]:
    r = api.post(route, json=body(**kw))
    assert r.status_code == 200, r.text
    data = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    return np.asarray(img.convert("RGB"), dtype=np.int16), json.loads(data["info"])


def params_of(info: dict) -> dict:
    return parse_infotext(info["infotexts"][0])


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_refiner_takes_over_and_reproduces(rapi):
    plain, plain_info = generate(rapi)
    refined, info = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    again, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    assert np.abs(refined - plain).mean() > 1, "the refiner did not change the picture"
    assert np.array_equal(refined, again), "the same request with a refiner gave another picture"
    params = params_of(info)
    assert params["Refiner"].startswith("zz-refiner-sd1 [") and params["Refiner"].endswith("]"), params
    assert float(params["Refiner switch at"]) == 0.5
    assert params["Model"] == "tiny-sd1"  # the job's own checkpoint stays the infotext's model
    assert "Refiner" not in params_of(plain_info)
    assert not [w for w in info.get("warnings", []) if "refiner" in w.lower()], info.get("warnings")
    # pasting it back (PNG Info, Send to, the infotext field) fills the refiner fields
    fields = infotext_to_request_fields(params)
    assert fields["refiner_checkpoint"] == params["Refiner"] and fields["refiner_switch_at"] == 0.5
    pasted, _ = generate(rapi, refiner_checkpoint=fields["refiner_checkpoint"], refiner_switch_at=0.5)
    assert np.array_equal(pasted, refined)


def test_refiner_switch_point_matters_and_one_means_never(rapi):
    plain, _ = generate(rapi)
    early, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.2)
    late, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.8)
    assert np.abs(early - late).mean() > 0.5
    never, info = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=1.0)
    assert np.array_equal(never, plain)  # completed never reaches 1.0: the refiner is not used (A1111)
    assert "Refiner" not in params_of(info)
    none, _ = generate(rapi, refiner_checkpoint="None", refiner_switch_at=0.5)  # A1111's "no refiner"
    assert np.array_equal(none, plain)


def test_refiner_in_batches_starts_each_batch_on_the_main_model(rapi):
    single, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5, seed=5)
    r = rapi.post("/txt2img", json=body(refiner_checkpoint=REFINER, refiner_switch_at=0.5, seed=5, n_iter=2))
    assert r.status_code == 200, r.text
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16)
    assert np.array_equal(first, single)
    second = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][1]))).convert("RGB"),
                        dtype=np.int16)
    alone, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5, seed=6)
    assert np.array_equal(second, alone)  # the second batch began on the main model again


def test_unknown_refiner_is_a_clear_4xx(rapi):
    r = rapi.post("/txt2img", json=body(refiner_checkpoint="nope.safetensors", refiner_switch_at=0.8))
    assert 400 <= r.status_code < 500, r.text
    text = r.text
    assert "refiner_checkpoint" in text and "nope.safetensors" in text
    r = rapi.post("/txt2img", json=body(enable_hr=True, hr_checkpoint_name="nope2"))
    assert 400 <= r.status_code < 500 and "hr_checkpoint_name" in r.text, r.text


def test_img2img_refiner(rapi):
    source = Image.new("RGB", (64, 64), (200, 120, 40))
    kw = dict(init_images=[png_b64(source)], denoising_strength=0.8)
    plain, _ = generate(rapi, "/img2img", **kw)
    refined, info = generate(rapi, "/img2img", refiner_checkpoint=REFINER, refiner_switch_at=0.6, **kw)
    again, _ = generate(rapi, "/img2img", refiner_checkpoint=REFINER, refiner_switch_at=0.6, **kw)
    assert np.abs(refined - plain).mean() > 1
    assert np.array_equal(refined, again)
    assert params_of(info)["Refiner"].startswith("zz-refiner-sd1 [")


def test_hires_checkpoint(rapi):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3)
    same, same_info = generate(rapi, **hires)
    other, info = generate(rapi, hr_checkpoint_name=REFINER, **hires)
    assert other.shape == (96, 96, 3)
    assert np.abs(other - same).mean() > 1, "the hires. checkpoint did not change the second pass"
    params = params_of(info)
    assert params["Hires checkpoint"].startswith("zz-refiner-sd1 ["), params
    assert params["Model"] == "tiny-sd1"
    assert "Hires checkpoint" not in same_info["infotexts"][0]
    explicit_same, _ = generate(rapi, hr_checkpoint_name="Use same checkpoint", **hires)
    assert np.array_equal(explicit_same, same)
    assert infotext_to_request_fields(params)["hr_checkpoint_name"] == params["Hires checkpoint"]
    # with an image upscaler: decoded by the first checkpoint, encoded and refined by the second
    image_up, _ = generate(rapi, hr_checkpoint_name=REFINER, **dict(hires, hr_upscaler="Lanczos"))
    assert image_up.shape == (96, 96, 3)


def test_firstpass_image_skips_the_first_pass(rapi):
    picture = Image.new("RGB", (64, 64), (30, 160, 220))
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.5, hr_second_pass_steps=2)
    generated, _ = generate(rapi, **hires)
    given, info = generate(rapi, firstpass_image=png_b64(picture), **hires)
    assert given.shape == (128, 128, 3)
    assert np.abs(given - generated).mean() > 1
    # the first pass is not sampled: its step count changes nothing
    many_steps, _ = generate(rapi, firstpass_image=png_b64(picture), **dict(hires, steps=40))
    assert np.array_equal(many_steps, given)
    assert not [w for w in info.get("warnings", []) if "firstpass" in w], info.get("warnings")
    # a latent upscaler encodes the given picture
    latent, _ = generate(rapi, firstpass_image=png_b64(picture), **dict(hires, hr_upscaler="Latent"))
    assert latent.shape == (128, 128, 3)
    # without hires. fix the picture is not used, and a warning says so
    plain, _ = generate(rapi)
    unused, info = generate(rapi, firstpass_image=png_b64(picture))
    assert np.array_equal(unused, plain)
    assert any(w.startswith("firstpass_image ") for w in info["warnings"]), info["warnings"]
    r = rapi.post("/txt2img", json=body(firstpass_image="not base64!", **hires))
    assert r.status_code in (400, 422) and "firstpass_image" in r.text, r.text


def test_sdxl_refiner_checkpoint_is_detected(tmp_path):
    from safetensors.torch import load_file

    from backend.engine.model_detection import detect_checkpoint
    from model_factory import write_tiny_checkpoint

    path = tmp_path / "refiner.safetensors"
    write_tiny_checkpoint(path, "sdxl_refiner", seed=2)
    sd = load_file(str(path))
    assert any(k.startswith("conditioner.embedders.0.model.transformer.") for k in sd)
    assert not any(k.startswith("conditioner.embedders.1.") for k in sd)
    spec = detect_checkpoint(sd)
    assert spec.family == "sdxl_refiner"
    assert spec.text_encoder_classes == ["CLIPTextModelWithProjection"]
    assert spec.unet_config["projection_class_embeddings_input_dim"] == 32 + 5 * 8  # pooled + 5 values
    assert spec.unet_config["cross_attention_dim"] == 64  # OpenCLIP-G's width alone


def test_sdxl_base_with_the_sdxl_refiner(rapi):
    xl = dict(override_settings={"sd_model_checkpoint": "tiny-sdxl.safetensors"}, width=64, height=64, steps=4)
    plain, _ = generate(rapi, **xl)
    refined, info = generate(rapi, refiner_checkpoint=XL_REFINER, refiner_switch_at=0.5, **xl)
    again, _ = generate(rapi, refiner_checkpoint=XL_REFINER, refiner_switch_at=0.5, **xl)
    assert np.abs(refined - plain).mean() > 1
    assert np.array_equal(refined, again)
    assert params_of(info)["Refiner"].startswith("zz-sdxl-refiner [")
    # the aesthetic scores condition the refiner (A1111's settings: prompt 6.0, negative prompt 2.5)
    scored, _ = generate(rapi, refiner_checkpoint=XL_REFINER, refiner_switch_at=0.5,
                         **dict(xl, override_settings={"sd_model_checkpoint": "tiny-sdxl.safetensors",
                                                       "sdxl_refiner_high_aesthetic_score": 9.5,
                                                       "sdxl_refiner_low_aesthetic_score": 0.5}))
    assert not np.array_equal(scored, refined)
    # and the refiner loads as the main model too (A1111 lets it run img2img on its own)
    source = Image.new("RGB", (64, 64), (90, 150, 60))
    alone, _ = generate(rapi, "/img2img", init_images=[png_b64(source)], denoising_strength=0.5,
                        override_settings={"sd_model_checkpoint": XL_REFINER})
    assert alone.shape == (64, 64, 3)


def test_ui_refiner_fields_and_paste():
    """The UI's accordion values -> the request's fields, and an infotext's fields -> the accordion (ui/refiner.py)."""
    from types import SimpleNamespace

    from backend.core.errors import UserError
    from ui.refiner import SAME_CHECKPOINT, pasted_values, request_fields

    off = request_fields({"refiner_enabled": False, "refiner_checkpoint": "a.safetensors [1]", "refiner_switch_at": 0.5,
                          "hr_checkpoint_name": None})
    assert off == {"refiner_checkpoint": None, "refiner_switch_at": None, "hr_checkpoint_name": SAME_CHECKPOINT}
    on = request_fields({"refiner_enabled": True, "refiner_checkpoint": "a.safetensors [1]", "refiner_switch_at": 0.5})
    assert on == {"refiner_checkpoint": "a.safetensors [1]", "refiner_switch_at": 0.5}
    assert request_fields({"refiner_enabled": True, "refiner_checkpoint": None, "refiner_switch_at": 0.8}) == \
        {"refiner_checkpoint": None, "refiner_switch_at": None}  # enabled without a checkpoint: none (A1111)

    def find(name):
        if name.startswith("zz-refiner-sd1"):
            return SimpleNamespace(title="zz-refiner-sd1.safetensors [0123456789]")
        raise UserError(f"Checkpoint {name!r} not found.")

    service = SimpleNamespace(registry=SimpleNamespace(find_checkpoint=find))
    pasted = pasted_values(service, infotext_to_request_fields(parse_infotext(
        "a cat\nSteps: 4, Seed: 1, Refiner: zz-refiner-sd1 [0123456789], Refiner switch at: 0.7")))
    assert pasted["refiner_enabled"] is True
    assert pasted["refiner_checkpoint"] == "zz-refiner-sd1.safetensors [0123456789]"  # the dropdown's title
    assert pasted["refiner_switch_at"] == 0.7 and pasted["hr_checkpoint_name"] == SAME_CHECKPOINT
    plain = pasted_values(service, infotext_to_request_fields(parse_infotext("a cat\nSteps: 4, Seed: 1")))
    assert plain["refiner_enabled"] is False
    elsewhere = pasted_values(service, {"refiner_checkpoint": "other [abc]"})
    assert elsewhere["refiner_checkpoint"] == "other [abc]"  # not on this machine: shown as written


def test_xyz_plot_refiner_axes(rapi):
    """X/Y/Z plot's "Refiner checkpoint" and "Refiner switch at" axes (A1111's): each cell with its refiner."""
    from backend.core.xyz_axes import XYZ_ARG_NAMES, xyz_axes

    axes = {a.label: i for i, a in reversed(list(enumerate(xyz_axes(False))))}

    def xyz(x_type, x_values, y_type=0, y_values=""):
        out = dict(x_type=x_type, x_values=x_values, x_values_dropdown=[], y_type=y_type, y_values=y_values,
                   y_values_dropdown=[], z_type=0, z_values="", z_values_dropdown=[], draw_legend=True,
                   include_lone_images=True, include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False,
                   vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
        return [out[name] for name in XYZ_ARG_NAMES]

    plain, _ = generate(rapi)
    refined, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    r = rapi.post("/txt2img", json=body(refiner_switch_at=0.5, script_name="X/Y/Z plot", script_args=xyz(
        axes["Refiner checkpoint"], "None, zz-refiner-sd1")))
    assert r.status_code == 200, r.text
    data = r.json()
    cells = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=np.int16)
             for b in data["images"][1:]]
    assert len(cells) == 2
    assert np.array_equal(cells[0], plain) and np.array_equal(cells[1], refined)
    r = rapi.post("/txt2img", json=body(refiner_checkpoint=REFINER, script_name="X/Y/Z plot", script_args=xyz(
        axes["Refiner switch at"], "0.5, 1")))
    assert r.status_code == 200, r.text
    cells = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=np.int16)
             for b in r.json()["images"][1:]]
    assert np.array_equal(cells[0], refined) and np.array_equal(cells[1], plain)
    r = rapi.post("/txt2img", json=body(script_name="X/Y/Z plot", script_args=xyz(
        axes["Refiner checkpoint"], "no-such-refiner")))
    assert r.status_code == 422 and "no-such-refiner" in r.text, r.text


def test_refiner_with_hires_fix_runs_in_the_pass_the_setting_names(rapi):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=3)
    no_refiner, _ = generate(rapi, **hires)
    second, info = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5, **hires)  # A1111's default
    assert np.abs(second - no_refiner).mean() > 1
    params = params_of(info)
    assert params["Refiner"].startswith("zz-refiner-sd1 [") and "Hires refiner" not in info["infotexts"][0]
    first, info = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5, **dict(
        hires, override_settings={"sd_model_checkpoint": MAIN, "hires_fix_refiner_pass": "first pass"}))
    assert np.abs(first - second).mean() > 1
    assert params_of(info)["Hires refiner"] == "first pass"


def test_tiling_tiles_the_refiner_for_the_job_only(rapi):
    as_main = dict(override_settings={"sd_model_checkpoint": REFINER})
    before, _ = generate(rapi, **as_main)
    refined, _ = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5)
    tiled, info = generate(rapi, refiner_checkpoint=REFINER, refiner_switch_at=0.5, tiling=True)
    assert np.abs(tiled - refined).mean() > 0.5 and params_of(info)["Tiling"] == "True"
    after, _ = generate(rapi, **as_main)
    assert np.array_equal(after, before)  # the refiner's convolutions got their padding back
