"""FLUX.1 and Stable Diffusion 3 end to end through the API: tiny random-weight models in the files users bring (a
transformer-only BFL file completed with ae / clip_l / t5xxl chosen in "VAE / Text Encoder", an all-in-one file, a
GGUF transformer, an SD 3.5 single file with its encoders), loaded by the real backend, sampled by the flow pipelines,
with FLUX LoRA applied and removed."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from flow_factory import (CLIP_L_TINY, T5_TINY, write_flux_controlnet_instantx, write_flux_lora_kohya, write_flux_set,
                          write_sd3)


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    data = tmp_path_factory.mktemp("easel-flow-e2e")
    models = data / "models"
    made = {"flux": write_flux_set(models, name="flux-tiny"),
            "flux_aio": write_flux_set(models, name="flux-aio", all_in_one=True, seed=3),
            "flux_gguf": write_flux_set(models, name="flux-q8", gguf="Q8_0", seed=0, with_parts=False),
            "flux_b": write_flux_set(models, name="flux-tiny-b", seed=5, with_parts=False),
            "flux_nf4": write_flux_set(models, name="flux-nf4", nf4=True, seed=0, with_parts=False)}
    write_sd3(models / "Stable-diffusion" / "sd35-tiny.safetensors", variant="sd3.5-medium", with_encoders=True)
    write_flux_lora_kohya(models / "Lora" / "flux-style.safetensors", made["flux"]["module"], rank=2, alpha=2.0)
    write_flux_controlnet_instantx(models / "ControlNet" / "flux-union-tiny.safetensors", union=True, seed=4,
                                   overrides={"joint_attention_dim": T5_TINY["d_model"],
                                              "pooled_projection_dim": CLIP_L_TINY["hidden_size"]})
    from backend.engine.previews import taesd_decoder
    (models / "VAE-taesd").mkdir()
    torch.manual_seed(2)
    torch.save(taesd_decoder(16).state_dict(), models / "VAE-taesd" / "taef1_decoder.pth")  # random, its layout
    return data, made


@pytest.fixture(scope="module")
def flow_api(flow_models, tiny_models):
    from conftest import Server

    data, _ = flow_models
    with Server(data, models={"sd1": tiny_models["sd1"]}) as srv:
        with httpx.Client(base_url=srv.url + "/sdapi/v1", timeout=600) as client:
            yield client


PARTS = ["ae.safetensors", "clip_l.safetensors", "t5xxl_tiny.safetensors"]


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _txt2img(api, checkpoint: str, parts=(), **fields):
    body = {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "seed": 7, "cfg_scale": 1,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": checkpoint,
                                                           "forge_additional_modules": list(parts)}}
    body.update(fields)
    r = api.post("/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return _image(data["images"][0]), json.loads(data["info"])["infotexts"][0]


def test_flux_transformer_with_its_parts(flow_api):
    """The BFL transformer-only file with ae, clip_l and t5xxl chosen: a picture, the same for the same seed, another
    for another distilled guidance; Forge's infotext entries."""
    image, info = _txt2img(flow_api, "flux-tiny", PARTS)
    assert image.shape == (64, 64, 3) and image.std() > 0
    for entry in ("Distilled CFG Scale: 3.5", "Module 1: ae", "Module 2: clip_l", "Module 3: t5xxl_tiny",
                  "Model: flux-tiny", "CFG scale: 1"):
        assert entry in info, info
    again, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    assert np.array_equal(image, again)
    other, info2 = _txt2img(flow_api, "flux-tiny", PARTS, distilled_cfg_scale=9.0)
    assert "Distilled CFG Scale: 9" in info2 and not np.array_equal(image, other)


def test_flux_final_decode_by_taef1(flow_api):
    """"VAE type for decode: TAESD" with a FLUX model: taef1's decoder from models/VAE-taesd, A1111's infotext entry."""
    full, info = _txt2img(flow_api, "flux-tiny", PARTS)
    body = {"prompt": "a red fox in the snow", "steps": 2, "width": 64, "height": 64, "seed": 7, "cfg_scale": 1,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "flux-tiny",
                                                           "forge_additional_modules": PARTS,
                                                           "sd_vae_decode_method": "TAESD"}}
    r = flow_api.post("/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    taesd, taesd_info = _image(data["images"][0]), json.loads(data["info"])["infotexts"][0]
    assert "VAE Decoder: TAESD" in taesd_info and "VAE Decoder" not in info
    assert taesd.shape == full.shape and not np.array_equal(taesd, full)
    assert not json.loads(data["info"]).get("warnings")


def test_flux_nf4_file_as_forge_distributes_it(flow_api):
    """Forge's bitsandbytes NF4 layout (flux-tiny's transformer at 4 bits), completed with the same parts: a picture
    near flux-tiny's (nearer than another transformer's), on the CPU, without bitsandbytes."""
    nf4, info = _txt2img(flow_api, "flux-nf4", PARTS)
    assert "Model: flux-nf4" in info and "Distilled CFG Scale: 3.5" in info
    full, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    other, _ = _txt2img(flow_api, "flux-tiny-b", PARTS)
    assert not np.array_equal(nf4, full)  # 4 bits are not the weights themselves
    assert np.abs(nf4 - full).mean() < np.abs(other - full).mean()


def test_flux_real_cfg_and_img2img(flow_api):
    """CFG above 1 runs the negative prompt too (another picture); img2img from a picture at denoising 0.5."""
    base, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    guided, _ = _txt2img(flow_api, "flux-tiny", PARTS, cfg_scale=4, negative_prompt="blurry")
    assert not np.array_equal(base, guided)
    buf = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).save(buf, format="PNG")
    r = flow_api.post("/img2img", json={
        "init_images": [base64.b64encode(buf.getvalue()).decode()], "prompt": "a fox", "steps": 2, "cfg_scale": 1,
        "denoising_strength": 0.5, "width": 64, "height": 64, "seed": 3,
        "override_settings": {"sd_model_checkpoint": "flux-tiny", "forge_additional_modules": PARTS}})
    assert r.status_code == 200, r.text
    assert _image(r.json()["images"][0]).shape == (64, 64, 3)
    assert "Denoising strength: 0.5" in json.loads(r.json()["info"])["infotexts"][0]


def test_flux_all_in_one_and_gguf(flow_api):
    """An all-in-one file needs no parts; the GGUF Q8_0 transformer with the parts gives nearly the picture of the
    same weights in float (the same seed: the quantization error is small)."""
    image, info = _txt2img(flow_api, "flux-aio")
    assert image.std() > 0 and "Module 1" not in info
    full, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    quant, info = _txt2img(flow_api, "flux-q8", PARTS)
    assert "Model: flux-q8" in info
    assert np.abs(full - quant).mean() < 12, np.abs(full - quant).mean()


def test_flux_without_its_parts_names_them(flow_api):
    r = flow_api.post("/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                        "override_settings": {"sd_model_checkpoint": "flux-tiny",
                                                              "forge_additional_modules": ["ae.safetensors"]}})
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert "CLIP-L" in detail and "T5-XXL" in detail and "VAE / Text Encoder" in detail, detail
    assert flow_api.get("/samplers").status_code == 200  # the server carries on


def test_flux_lora_applies_and_goes_away(flow_api):
    base, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    styled, info = _txt2img(flow_api, "flux-tiny", PARTS, prompt="a red fox in the snow <lora:flux-style:1>")
    assert "Lora hashes" in info and "flux-style" in info, info
    assert not np.array_equal(base, styled)
    after, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    assert np.array_equal(base, after)  # removed exactly


def test_sd35_single_file_with_its_encoders(flow_api):
    image, info = _txt2img(flow_api, "sd35-tiny", cfg_scale=4, negative_prompt="ugly")
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert "Model: sd35-tiny" in info and "Distilled CFG Scale" not in info, info


def _drawn_png() -> str:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    for x in range(16, 48):
        for y in (16, 47):
            image.putpixel((x, y), (255, 255, 255))
            image.putpixel((y, x), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_flux_controlnet_union_unit(flow_api):
    """A FLUX union ControlNet (InstantX layout) in models/ControlNet, used through sd-webui-controlnet's API: canny
    steers the picture, weight 0 leaves it as without the unit; an SD ControlNet model name for FLUX is refused."""
    plain, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    unit = {"enabled": True, "image": _drawn_png(), "module": "canny", "model": "flux-union-tiny", "weight": 1.0,
            "resize_mode": 1, "processor_res": 64, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0,
            "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False}
    scripts = {"controlnet": {"args": [unit]}}
    guided, info = _txt2img(flow_api, "flux-tiny", PARTS, alwayson_scripts=scripts)
    assert 'ControlNet 0: "Module: canny, Model: flux-union-tiny' in info, info
    assert np.abs(guided - plain).mean() > 1
    zero, _ = _txt2img(flow_api, "flux-tiny", PARTS, alwayson_scripts={"controlnet": {"args": [dict(unit, weight=0)]}})
    assert np.array_equal(zero, plain)


def test_a_flux_file_chosen_before_its_parts_stays_chosen(flow_api):
    """Forge's order: the transformer-only file chosen first (its load says what is missing, 424, and it stays the
    choice), then its parts; the next generation loads it with them. Any other load failure puts the old choice back."""
    flow_api.post("/options", json={"forge_additional_modules": []})
    r = flow_api.post("/options", json={"sd_model_checkpoint": "flux-tiny"})
    assert r.status_code == 424, r.text
    assert "T5-XXL" in r.json()["detail"]
    assert flow_api.get("/options").json()["sd_model_checkpoint"].startswith("flux-tiny.safetensors")
    assert flow_api.post("/options", json={"forge_additional_modules": PARTS}).status_code == 200
    r = flow_api.post("/txt2img", json={"prompt": "a fox", "steps": 1, "width": 64, "height": 64, "cfg_scale": 1})
    assert r.status_code == 200, r.text
    assert "Model: flux-tiny" in json.loads(r.json()["info"])["infotexts"][0]
    flow_api.post("/options", json={"forge_additional_modules": [], "sd_model_checkpoint": "tiny-sd1.safetensors"})


def test_checkpoint_merger_with_flux(flow_api, flow_models):
    """The Checkpoint Merger on two FLUX transformers: the weighted sum tensor by tensor; a GGUF file (quantized
    blocks, no float tensors to add) and an SD checkpoint are refused with a message."""
    from safetensors.torch import load_file

    _, made = flow_models
    url = str(flow_api.base_url).split("/sdapi")[0] + "/easel/v1/merge-checkpoints"
    r = httpx.post(url, json={"primary_model_name": "flux-tiny", "secondary_model_name": "flux-tiny-b",
                              "multiplier": 0.25, "custom_name": "flux-merged"}, timeout=600)
    assert r.status_code == 200, r.text
    merged = load_file(r.json()["path"])
    a, b = load_file(str(made["flux"]["checkpoint"])), load_file(str(made["flux_b"]["checkpoint"]))
    key = "double_blocks.0.img_attn.qkv.weight"
    expected = a[key].float() * 0.75 + b[key].float() * 0.25
    assert (merged[key].float() - expected).abs().max() < 1e-2  # stored in float16 (the default "save as")
    for other, why in (("flux-q8", "GGUF"), ("flux-nf4", "NF4"), ("tiny-sd1", "different families")):
        r = httpx.post(url, json={"primary_model_name": "flux-tiny", "secondary_model_name": other,
                                  "multiplier": 0.5, "custom_name": f"bad-{other}"}, timeout=600)
        assert 400 <= r.status_code < 500, r.text
        assert why in r.json()["detail"], r.text


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_flux_hires_fix_and_inpaint(flow_api):
    """Hires. fix (latent and image upscalers) to 96x96, and inpainting: outside the mask the picture is kept."""
    for upscaler in ("Latent", "Lanczos"):
        image, info = _txt2img(flow_api, "flux-tiny", PARTS, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                               hr_second_pass_steps=1, denoising_strength=0.6)
        assert image.shape == (96, 96, 3) and f"Hires upscaler: {upscaler}" in info, info
    base, _ = _txt2img(flow_api, "flux-tiny", PARTS)
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    r = flow_api.post("/img2img", json={
        "init_images": [_png(base)], "mask": _png(mask), "prompt": "a blue bird", "steps": 2, "cfg_scale": 1,
        "denoising_strength": 1.0, "width": 64, "height": 64, "seed": 11, "inpainting_fill": 1, "mask_blur": 0,
        "inpaint_full_res": False,
        "override_settings": {"sd_model_checkpoint": "flux-tiny", "forge_additional_modules": PARTS}})
    assert r.status_code == 200, r.text
    out = _image(r.json()["images"][0])
    outside = np.ones((64, 64), dtype=bool)
    outside[12:52, 12:52] = False
    assert np.abs(out[outside] - base[outside]).mean() < 3  # kept (only the VAE round trip's small changes)
    assert np.abs(out[24:40, 24:40] - base[24:40, 24:40]).mean() > 3  # repainted


@pytest.mark.parametrize("checkpoint", ["flux-q8", "flux-nf4"], ids=["GGUF", "NF4"])
def test_flux_lora_on_quantized_weights(flow_api, checkpoint):
    """The LoRA on a GGUF or NF4 transformer is added at compute time: it changes the picture and goes away
    exactly."""
    base, _ = _txt2img(flow_api, checkpoint, PARTS)
    styled, info = _txt2img(flow_api, checkpoint, PARTS, prompt="a red fox in the snow <lora:flux-style:1>")
    assert "flux-style" in info and not np.array_equal(base, styled)
    after, _ = _txt2img(flow_api, checkpoint, PARTS)
    assert np.array_equal(base, after)


def test_flux_xyz_plot_over_steps(flow_api):
    """X/Y/Z plot with a FLUX checkpoint: a grid and one cell per value, each cell's infotext with its steps."""
    from backend.core.xyz_axes import XYZ_ARG_NAMES, xyz_axes

    steps_axis = next(i for i, a in enumerate(xyz_axes(False)) if a.label == "Steps")
    args = dict(x_type=steps_axis, x_values="1, 2", x_values_dropdown=[], y_type=0, y_values="", y_values_dropdown=[],
                z_type=0, z_values="", z_values_dropdown=[], draw_legend=False, include_lone_images=True,
                include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False,
                vary_seeds_z=False, margin_size=0, csv_mode=False)
    body = {"prompt": "a fox", "steps": 3, "width": 64, "height": 64, "seed": 5, "cfg_scale": 1,
            "script_name": "X/Y/Z plot", "script_args": [args[n] for n in XYZ_ARG_NAMES],
            "override_settings": {"sd_model_checkpoint": "flux-tiny", "forge_additional_modules": PARTS}}
    r = flow_api.post("/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 3  # the grid, then the two cells
    assert _image(data["images"][0]).shape == (64, 128, 3)
    texts = json.loads(data["info"])["infotexts"]
    assert any("Steps: 1," in t for t in texts[1:]) and any("Steps: 2," in t for t in texts[1:]), texts
    assert all("Distilled CFG Scale: 3.5" in t for t in texts[1:])
