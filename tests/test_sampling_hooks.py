"""The denoiser's hook interface (backend/engine/sampling_hooks.py) through the real txt2img pipeline on the tiny
SD 1.x model: hooks that change nothing leave the pixels bit-identical, the documented example (docs/sampling_hooks.md)
takes effect, each hook point runs when the page says with the step state it says, and the hooks' results are used."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from backend.checkpoints import ModelFile
from backend.core.options import SETTINGS
from backend.core.sampler_catalog import resolve_sampling
from backend.core.schemas import Txt2ImgRequest
from backend.engine.devices import DevicePolicy
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.engine.pipelines import txt2img
from backend.engine.pipelines.common import JobContext, StepClock
from backend.engine.sampling_hooks import HookChain, SamplingHook, StepState, UNetCall

torch.set_num_threads(1)
DOC = Path(__file__).resolve().parent.parent / "docs" / "sampling_hooks.md"


def documented_example() -> dict:
    """The code block of the page's example, executed: what a reader copies is what is tested."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- example: cfg-ramp -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the example is missing from docs/sampling_hooks.md"
    namespace: dict = {}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)  # noqa: S102  our own documentation
    return namespace


@pytest.fixture(scope="module")
def job(tiny_models):
    policy = DevicePolicy(device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32)
    loaded = LoadedModel(load_sd_model(tiny_models["sd1"]))
    policy.place(loaded)
    ckpt = tiny_models["sd1"]

    def generate(hooks, **req_kw):
        ctx = JobContext(loaded=loaded, policy=policy, options={s.key: s.default for s in SETTINGS},
                         outputs_root=ckpt.parent, checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None,
                         control=StepClock(), sampling_hooks=list(hooks))
        body = dict(prompt="a red house", negative_prompt="blurry", steps=4, width=64, height=64, seed=7,
                    sampler_name="Euler", cfg_scale=7, do_not_save_samples=True, do_not_save_grid=True)
        body.update(req_kw)
        req = Txt2ImgRequest(**body)
        ctx.sampling = resolve_sampling(req, ctx.options["default_sampler"])
        result = txt2img.run(req, ctx)
        return np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int32)

    return generate


@pytest.fixture(scope="module")
def baseline(job):
    return job([])


class EveryPointUnchanged(SamplingHook):
    """Overrides every hook point and hands each value back unchanged."""

    def unet_inputs(self, state, call):
        return call.with_changes(context=call.context)

    def residuals(self, state, call):
        return None

    def combine_cfg(self, state, cond, uncond, scale, combined):
        return combined

    def after_denoise(self, state, x, denoised):
        return denoised

    def after_step(self, state, x, denoised):
        pass

    def after_sampling(self, state, latents):
        return latents

    def after_decode(self, state, images):
        return images


def test_hooks_that_change_nothing_give_bit_identical_pixels(job, baseline):
    assert np.array_equal(job([SamplingHook()]), baseline)
    assert np.array_equal(job([EveryPointUnchanged(), EveryPointUnchanged()]), baseline)


def test_the_documented_example_takes_effect(job, baseline):
    CFGRamp = documented_example()["CFGRamp"]
    ramped = job([CFGRamp(first_scale=1.0)])
    assert np.abs(ramped - baseline).mean() > 5  # the first steps with guidance 1, not 7: another picture
    # A ramp from the request's own scale is the plain CFG mix, computed the same way: the same pixels.
    assert np.array_equal(job([CFGRamp(first_scale=7.0)]), baseline)


class Recorder(SamplingHook):
    def __init__(self):
        self.seen: list[tuple] = []

    def unet_inputs(self, state, call):
        self.seen.append(("unet_inputs", state.pass_name, state.step, state.total_steps, state.width,
                          tuple(call.sample.shape), None if call.cond_mask is None else call.cond_mask.tolist()))
        return call

    def combine_cfg(self, state, cond, uncond, scale, combined):
        self.seen.append(("combine_cfg", state.pass_name, state.step, scale))
        return combined

    def after_step(self, state, x, denoised):
        self.seen.append(("after_step", state.pass_name, state.step, state.total_steps))

    def after_sampling(self, state, latents):
        self.seen.append(("after_sampling", state.pass_name, state.step, state.total_steps, tuple(latents.shape)))
        return latents

    def after_decode(self, state, images):
        self.seen.append(("after_decode", state.pass_name, [im.size for im in images]))
        return images


def test_each_point_runs_when_documented_with_the_pass_and_step(job, baseline):
    rec = Recorder()
    job([rec], enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5)
    first = [s for s in rec.seen if s[1] == "first"]
    hires = [s for s in rec.seen if s[1] == "hires"]
    # Euler: one model call per step; CFG doubles the batch (conditional rows first)
    assert [s[2] for s in first if s[0] == "unet_inputs"] == [0, 1, 2, 3]
    assert all(s[3:] == (4, 64, (2, 4, 8, 8), [1.0, 0.0]) for s in first if s[0] == "unet_inputs")
    assert [s[2] for s in first if s[0] == "combine_cfg"] == [0, 1, 2, 3]
    assert [s[2:] for s in first if s[0] == "after_step"] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [s for s in first if s[0] == "after_sampling"] == [("after_sampling", "first", 4, 4, (1, 4, 8, 8))]
    # hires. fix: its own pass name, step count and size; the final pictures are the hires ones
    assert [s[2:] for s in hires if s[0] == "after_step"] == [(0, 2), (1, 2)]
    assert all(s[4:6] == (96, (2, 4, 12, 12)) for s in hires if s[0] == "unet_inputs")
    assert [s for s in hires if s[0] == "after_sampling"] == [("after_sampling", "hires", 2, 2, (1, 4, 12, 12))]
    assert [s for s in rec.seen if s[0] == "after_decode"] == [("after_decode", "hires", [(96, 96)])]
    order = [s[0] for s in rec.seen]
    assert order.index("after_sampling") > order.index("after_step") and order[-1] == "after_decode"


def test_hook_results_are_used(job, baseline):
    class Invert(SamplingHook):
        def after_decode(self, state, images):
            return [ImageOps.invert(im) for im in images]

    assert np.array_equal(job([Invert()]), 255 - baseline)

    class NoText(SamplingHook):  # the UNet sees empty text features: the prompt no longer matters
        def unet_inputs(self, state, call):
            return call.with_changes(context=torch.zeros_like(call.context))

    blank = job([NoText()])
    assert np.abs(blank - baseline).mean() > 1
    assert np.array_equal(job([NoText()], prompt="a blue car", negative_prompt="sharp"), blank)


def test_residuals_of_several_hooks_are_summed():
    class Constant(SamplingHook):
        def __init__(self, value, mid=True):
            self.value, self.mid = value, mid

        def residuals(self, state, call):
            out = {"down_block_additional_residuals": (torch.full((1, 2), self.value), torch.full((1, 3), self.value))}
            if self.mid:
                out["mid_block_additional_residual"] = torch.full((1, 1), self.value)
            return out

    class Nothing(SamplingHook):
        def residuals(self, state, call):
            return None

    state = StepState(pass_name="first", step=0, total_steps=1, width=64, height=64)
    call = UNetCall(sample=torch.zeros(1, 4, 8, 8), timestep=torch.zeros(1), context=torch.zeros(1, 77, 32))
    out = HookChain([Constant(1.0), Nothing(), Constant(2.5, mid=False)]).residuals(state, call)
    assert [t.tolist() for t in out["down_block_additional_residuals"]] == [[[3.5, 3.5]], [[3.5, 3.5, 3.5]]]
    assert out["mid_block_additional_residual"].tolist() == [[1.0]]
    assert HookChain([Nothing()]).residuals(state, call) == {}


def test_only_sampling_hooks_are_accepted():
    with pytest.raises(TypeError, match="not a SamplingHook"):
        HookChain([object()])
