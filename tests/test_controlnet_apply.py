"""ControlNet in the pipelines (in-process, tiny models): effect, weight 0, step ranges, multi-unit, control modes,
hires. fix, SDXL, bad input, and the memory policy."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.checkpoints import ModelFile
from backend.core.cmd_args import parse_args
from backend.engine.controlnet.apply import ActiveControl, ControlSet
from backend.controlnet.units import UnitJob
from backend.engine.controlnet.runtime import ControlNetCache, prepare_controls
from backend.engine.controlnet.script import ControlNetHook
from backend.controlnet.units import ControlUnit
from backend.engine.devices import DevicePolicy
from backend.core.errors import UserError
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.core.options import SETTINGS
from backend.core import request_checks
from backend.core.sampler_catalog import resolve_sampling
from backend.engine.pipelines import txt2img
from backend.engine.pipelines.common import JobContext, StepClock
from backend.core.schemas import Txt2ImgRequest
from controlnet_factory import write_tiny_controlnet

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("controlnets")
    files = {
        "canny": folder / "control_v11p_sd15_canny.pth",
        "depth": folder / "control_v11f1p_sd15_depth_fp16.safetensors",
        "xl": folder / "diffusers_xl_canny_full.safetensors",
    }
    write_tiny_controlnet(files["canny"], "sd1", seed=11)
    write_tiny_controlnet(files["depth"], "sd1", seed=12, dtype=torch.float16)
    write_tiny_controlnet(files["xl"], "sdxl", layout="diffusers", seed=13)
    policy = DevicePolicy.from_args(parse_args(["--use-cpu", "all"]))
    models = {"sd1": LoadedModel(load_sd_model(tiny_models["sd1"])), "sdxl": LoadedModel(load_sd_model(tiny_models["sdxl"]))}
    for m in models.values():
        policy.place(m)
    return {"files": files, "policy": policy, "models": models, "cache": ControlNetCache(policy), "ckpts": tiny_models}


def control_image() -> Image.Image:
    img = Image.new("RGB", (96, 96), "black")
    ImageDraw.Draw(img).rectangle((20, 30, 75, 70), fill="white")
    return img


def unit(env, key="canny", **kw) -> UnitJob:
    kw.setdefault("module", "canny")
    kw.setdefault("image", control_image())
    kw.setdefault("processor_res", 96)
    path = env["files"][key]
    return UnitJob(ControlUnit(model=path.stem, **kw), str(path), f"{path.stem} [00000000]")


def generate(env, units, family="sd1", control=None, **req_kw):
    model = env["models"][family]
    ckpt = env["ckpts"][family]
    opts = {s.key: s.default for s in SETTINGS}
    body = dict(prompt="a house", steps=4, width=64, height=64, seed=3, sampler_name="Euler", cfg_scale=7,
                do_not_save_samples=True, do_not_save_grid=True)
    body.update(req_kw)
    req = Txt2ImgRequest(**body)
    ctx = JobContext(loaded=model, policy=env["policy"], options=opts, outputs_root=ckpt.parent,
                     checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=control or StepClock(),
                     sampling=resolve_sampling(req, opts["default_sampler"]))
    hires = request_checks.hires_size(req) if req.enable_hr else None
    maps, controls = [], None
    if units:
        controls, maps = prepare_controls(units, ctx, env["cache"], width=req.width, height=req.height,
                                          hires_size=hires, seed=3)
    ctx.sampling_hooks = [ControlNetHook(controls)] if controls else []  # as the engine's ControlNet script does
    result = txt2img.run(req, ctx)
    pixels = np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int32)
    return pixels, result, Prepared(ctx, controls), maps


@dataclass
class Prepared:
    """The job's context and the ControlSet its hook used (None: no unit applied)."""

    ctx: JobContext
    controls: ControlSet | None


@pytest.fixture(scope="module")
def baseline(env):
    return generate(env, [])[0]


def test_an_enabled_unit_changes_the_output_and_is_recorded(env, baseline):
    pixels, result, ctx, maps = generate(env, [unit(env)])
    assert np.abs(pixels - baseline).mean() > 2
    assert ctx.controls.calls == 4  # one batched call (cond + uncond) per Euler step
    text = result.images[0].infotext
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [00000000], Weight: 1, ' in text
    assert len(maps) == 1 and Image.open(io.BytesIO(maps[0])).size == (96, 96)  # canny map at processor size


def test_weight_zero_gives_exactly_the_uncontrolled_output(env, baseline):
    pixels, result, ctx, _ = generate(env, [unit(env, weight=0.0)])
    assert np.array_equal(pixels, baseline)
    assert ctx.controls is None
    assert "Weight: 0" in result.images[0].infotext


def test_step_range_applies_only_in_those_steps(env, baseline):
    for start, end, expected in ((0.5, 1.0, [2, 3]), (0.0, 0.25, [0, 1]), (0.3, 0.6, [2])):
        ctl = StepClock()
        seen = []
        model, _ = env["cache"].get(env["files"]["canny"], env["models"]["sd1"].model, 4)
        handle = model.register_forward_pre_hook(lambda m, a: seen.append(ctl.steps))
        try:
            pixels, *_ = generate(env, [unit(env, guidance_start=start, guidance_end=end)], control=ctl)
        finally:
            handle.remove()
        assert seen == expected, (start, end, seen)
        assert not np.array_equal(pixels, baseline)


def test_two_units_combine(env, baseline):
    a = generate(env, [unit(env)])[0]
    b = generate(env, [unit(env, "depth", module="none", weight=0.7)])[0]
    both, _, ctx, maps = generate(env, [unit(env), unit(env, "depth", module="none", weight=0.7)])
    assert ctx.controls.calls == 8 and len(ctx.controls.controls) == 2
    for other in (a, b, baseline):
        assert np.abs(both - other).mean() > 1
    assert len(maps) == 1  # "none" has no detected map to show
    # the residuals of two units are the sums of each unit's residuals
    ca = ctx.controls.controls[0]
    cb = ctx.controls.controls[1]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(sample=x, timestep=torch.tensor([500.0, 500.0]), context=torch.randn(2, 77, 32), added_cond_kwargs=None,
                cond_mask=torch.tensor([1.0, 0.0]), step=0, total_steps=4, width=64, height=64)
    ra, rb, rab = (ControlSet(c).residuals(**args) for c in ([ca], [cb], [ca, cb]))
    for i in range(len(rab["down_block_additional_residuals"])):
        assert torch.allclose(rab["down_block_additional_residuals"][i],
                              ra["down_block_additional_residuals"][i] + rb["down_block_additional_residuals"][i], atol=1e-5)
    assert torch.allclose(rab["mid_block_additional_residual"],
                          ra["mid_block_additional_residual"] + rb["mid_block_additional_residual"], atol=1e-5)
    # each unit adds residuals of its own (not zeros, not the other unit's), so the sums above say something
    for i in range(len(rab["down_block_additional_residuals"])):
        a, b = ra["down_block_additional_residuals"][i], rb["down_block_additional_residuals"][i]
        assert a.abs().max() > 1e-4 and b.abs().max() > 1e-4, i
        assert not torch.allclose(a, b, atol=1e-5), i


def test_control_modes(env):
    _, _, ctx, _ = generate(env, [unit(env)])
    base = ctx.controls.controls[0]
    args = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([300.0, 300.0]), context=torch.randn(2, 77, 32),
                added_cond_kwargs=None, cond_mask=torch.tensor([1.0, 0.0]), step=0, total_steps=4, width=64, height=64)
    balanced = ControlSet([base]).residuals(**args)
    prompt = ActiveControl(**{**base.__dict__, "control_mode": "My prompt is more important", "_hints": {}})
    soft = ControlSet([prompt]).residuals(**args)
    n = len(soft["down_block_additional_residuals"]) + 1
    for i, (s, b) in enumerate(zip(soft["down_block_additional_residuals"], balanced["down_block_additional_residuals"])):
        assert torch.allclose(s, b * 0.825 ** (n - 1 - i), atol=1e-6)
    assert torch.allclose(soft["mid_block_additional_residual"], balanced["mid_block_additional_residual"])
    control = ActiveControl(**{**base.__dict__, "control_mode": "ControlNet is more important", "_hints": {}})
    cn_more = ControlSet([control]).residuals(**args)
    for r in cn_more["down_block_additional_residuals"]:
        assert r[1].abs().max() == 0 and r[0].abs().max() > 0  # unconditional row gets no control
    assert prompt.scales(13, False)[0] == pytest.approx(0.825 ** 12)


def test_hires_fix_applies_control_in_both_passes_per_hr_option(env):
    counts = {}
    for option in ("Both", "Low res only", "High res only"):
        _, result, ctx, _ = generate(env, [unit(env, hr_option=option)], enable_hr=True, hr_scale=1.5,
                                     hr_second_pass_steps=2, denoising_strength=0.5)
        counts[option] = ctx.controls.calls
        assert result.images[0].infotext.count("Hr Option: " + option) == 1
    # Euler: 4 first-pass steps, then 2 hires steps
    assert counts == {"Both": 6, "Low res only": 4, "High res only": 2}


def test_sdxl_controlnet_in_diffusers_format(env):
    plain = generate(env, [], family="sdxl")[0]
    pixels, result, ctx, _ = generate(env, [unit(env, "xl")], family="sdxl")
    assert ctx.controls.calls == 4 and np.abs(pixels - plain).mean() > 1


def test_model_for_another_family_is_skipped_with_a_warning(env, baseline):
    pixels, result, ctx, _ = generate(env, [unit(env, "xl"), unit(env, guidance_start=0.9, guidance_end=0.1)])
    assert np.array_equal(pixels, baseline)
    text = " ".join(result.warnings)
    assert "ControlNet unit 0" in text and "SDXL ControlNet" in text and "Stable Diffusion 1.x" in text
    assert "ControlNet unit 1" in text and "applies in no step" in text


def test_missing_image_is_an_error(env):
    with pytest.raises(UserError, match="ControlNet unit 0 is enabled but has no control image"):
        generate(env, [unit(env, image=None)])


def test_medvram_and_lowvram_offload_the_controlnet_like_the_unet(env, tiny_models):
    """On a CPU 'device' the policy's hooks still run: the ControlNet is swapped by the UNet's swapper."""
    from backend.engine.devices import unet_blocks
    for mode in ("medvram", "lowvram"):
        policy = DevicePolicy(device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32, mode=mode)
        model = LoadedModel(load_sd_model(tiny_models["sd1"]))
        policy.place(model)
        cache = ControlNetCache(policy)
        local = dict(env, policy=policy, models={"sd1": model}, cache=cache)
        before = model.streamer.transfers
        generate(local, [])
        plain = model.streamer.transfers - before
        before = model.streamer.transfers
        _, _, ctx, _ = generate(local, [unit(env)])
        with_cn = model.streamer.transfers - before
        cn = ctx.controls.controls[0].model
        expected_hooks = 1 if mode == "medvram" else len(unet_blocks(cn))
        assert len(model.companion(cn).hooks) == expected_hooks
        assert sum(len(m._forward_pre_hooks) for m in cn.modules()) == expected_hooks
        assert with_cn > plain  # the ControlNet took turns on the device with the UNet
        cache.clear()
        assert model.companion(cn) is None and sum(len(m._forward_pre_hooks) for m in cn.modules()) == 0


def test_loaded_controlnets_stay_cached_up_to_the_limit(env):
    policy = env["policy"]
    cache = ControlNetCache(policy)
    sd1 = env["models"]["sd1"].model
    a1, _ = cache.get(env["files"]["canny"], sd1, limit=1)
    a2, _ = cache.get(env["files"]["canny"], sd1, limit=1)
    assert a1 is a2 and cache.loads == 1
    cache.get(env["files"]["depth"], sd1, limit=1)
    assert cache.loads == 2 and len(cache.models) == 1  # the least recently used one was evicted
    cache.get(env["files"]["canny"], sd1, limit=1)
    assert cache.loads == 3


def test_inpaint_hint_is_minus_one_under_the_mask():
    from backend.engine.controlnet.runtime import inpaint_mask_for
    from backend.controlnet.units import ControlUnit

    picture = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half transparent: the part to repaint
    mask = inpaint_mask_for(ControlUnit(), picture, None)
    assert mask is not None and np.asarray(mask)[:, :16].min() == 255 and np.asarray(mask)[:, 16:].max() == 0
    active = ActiveControl(index=0, model=None, detected_map=picture.convert("RGB"), image_like=True, hint_mask=mask,
                           resize_mode="Just Resize")
    hint = active.hint(64, 64, "cpu", torch.float32, hires=False)[0]
    assert torch.all(hint[:, :, :32] == -1) and torch.all(hint[:, :, 34:] == 1)  # (32-33: the resize blends the edge)
    # the unit's own mask wins over the picture's alpha; an empty mask means no mask
    own = Image.new("L", (32, 32), 0)
    own.paste(255, (0, 0, 32, 8))
    assert np.asarray(inpaint_mask_for(ControlUnit(mask=own), picture, None))[:8].min() == 255
    assert inpaint_mask_for(ControlUnit(), picture.convert("RGB"), Image.new("L", (32, 32), 0)) is None
