"""Few-step distilled models (SDXL-Lightning, Hyper-SD, SD-Turbo / SDXL-Turbo) as their authors run them: diffusers'
Euler with "trailing" timestep spacing (999, 749, 499, 249 for 4 steps; 999 alone for 1 step), CFG 1. In Easel (as in
A1111 and Forge) that is the Euler sampler with the "Simple" schedule (the same timesteps, to float precision) or
"SGM Uniform" (the same spacing, linearly interpolated timesteps 999, 749.25, ...). Checked on the same UNet and
noise: Easel's steps are diffusers' steps."""
from __future__ import annotations

import pytest
import torch

from backend.engine import schedules
from backend.engine.conditioning import ScheduledConds, TextConditioner
from backend.engine.pipelines.common import CFGDenoiser
from backend.engine.samplers import SAMPLE_FUNCTIONS

torch.set_num_threads(1)
CPU = torch.device("cpu")
# Both run the same UNet calls in float32; Easel finds the timestep back from its sigma (log-sigma interpolation).
TOLERANCE = 1e-4


def trailing_euler(steps: int, ancestral: bool = False):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    # SD 1.x / SDXL's training schedule (the Lightning / Hyper-SD / Turbo scheduler configs), trailing spacing
    sched = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps, timesteps", [(4, [999, 749, 499, 249]), (2, [999, 499]), (1, [999])])
def test_simple_and_sgm_uniform_are_trailing_spacing(sd1, steps, timesteps):
    sched = trailing_euler(steps)
    assert [int(t) for t in sched.timesteps] == timesteps
    model_schedule = schedules.model_schedule(sd1)
    simple = schedules.get_sigmas("Simple", steps, model_schedule, "Euler")
    assert torch.allclose(simple, sched.sigmas.float(), rtol=1e-5)
    sgm = schedules.get_sigmas("SGM Uniform", steps, model_schedule, "Euler")
    assert torch.allclose(sgm, sched.sigmas.float(), rtol=0.01)  # t 749.25 instead of 749: under 1% in sigma
    assert sgm[0] == pytest.approx(float(sched.sigmas[0]), rel=1e-5)  # both start at t = 999


def _denoiser(model, steps: int):
    conditioner = TextConditioner(model, CPU)
    cond = conditioner.encode("a lightning-fast fox")
    conds = ScheduledConds([[(steps, cond)]])
    denoiser = CFGDenoiser(model, schedules.model_schedule(model), conds, conds, 1.0, conditioner, CPU, torch.float32,
                           64, 64)
    denoiser.start_pass(steps)
    return denoiser, cond


@pytest.mark.parametrize("steps", [4, 1])
def test_euler_simple_takes_diffusers_trailing_euler_steps(sd1, steps):
    """Lightning / Hyper-SD (4 steps) and Turbo (1 step): Euler, Simple schedule, CFG 1 = diffusers' trailing Euler."""
    sched = trailing_euler(steps)
    denoiser, cond = _denoiser(sd1, steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    theirs, sample = [], noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = sd1.unet(sched.scale_model_input(sample, t), t, encoder_hidden_states=cond.crossattn[None],
                           return_dict=False)[0]
            out = sched.step(eps, t, sample)
            theirs.append(out.pred_original_sample)
            sample = out.prev_sample

    sigmas = schedules.get_sigmas("Simple", steps, schedules.model_schedule(sd1), "Euler")
    ours = []
    result = SAMPLE_FUNCTIONS["Euler"](denoiser, noise * sigmas[0], sigmas, callback=lambda d: ours.append(d["denoised"]))
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() < TOLERANCE, (i, (a - b).abs().max().item())
    assert (result - sample).abs().max().item() < TOLERANCE
    if steps > 1:
        assert not torch.allclose(ours[0], ours[-1], atol=1e-2)  # the steps do something


def test_one_step_euler_a_is_sd_turbos_single_step(sd1):
    """SD-Turbo / SDXL-Turbo's reference: Euler Ancestral, trailing, 1 step at t = 999, CFG 1: the picture is the
    model's x0 prediction from pure noise (no noise added back after the last step), as Easel's Euler a gives it."""
    sched = trailing_euler(1, ancestral=True)
    denoiser, cond = _denoiser(sd1, 1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sample = noise * sched.init_noise_sigma
    with torch.no_grad():
        t = sched.timesteps[0]
        eps = sd1.unet(sched.scale_model_input(sample, t), t, encoder_hidden_states=cond.crossattn[None],
                       return_dict=False)[0]
        theirs = sched.step(eps, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    sigmas = schedules.get_sigmas("SGM Uniform", 1, schedules.model_schedule(sd1), "Euler a")
    ours = SAMPLE_FUNCTIONS["Euler a"](denoiser, noise * sigmas[0], sigmas,
                                       noise_sampler=lambda s, sn: torch.zeros_like(noise))
    assert (ours - theirs).abs().max().item() < TOLERANCE
