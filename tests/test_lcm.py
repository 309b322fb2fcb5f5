"""Distilled models as their authors run them: Easel's "LCM" sampler (its Automatic schedule: LCM's timesteps)
takes the same steps as diffusers' `LCMScheduler` on the same UNet and noise, and an LCM-LoRA in the layouts it is
shared in (the released `pytorch_lora_weights.safetensors`: kohya-prefixed diffusers module names with alpha;
diffusers' `unet.….lora.down`; PEFT's `unet.….lora_A`) changes every module it names by the LoRA formula."""
from __future__ import annotations

import pytest
import torch

from backend.engine import schedules
from backend.engine.conditioning import ScheduledConds, TextConditioner
from backend.engine.loaded_model import LoadedModel
from backend.engine.networks.lora_apply import ActiveNetwork, NetworkPatcher
from backend.engine.networks.lora_files import read_network_file
from backend.engine.pipelines.common import CFGDenoiser
from backend.engine.samplers import SAMPLE_FUNCTIONS
from lora_factory import build_file, save_lora, weight_shapes

torch.set_num_threads(1)
CPU = torch.device("cpu")
STEPS = 4
# The x0 predictions of both agree to this (absolute, on latents of about unit size): the same UNet calls in float32,
# Easel's timestep found back from its sigma (log-sigma interpolation) and LCMScheduler's boundary condition
# (c_skip = 0.25 / ((10 t)^2 + 0.25), at most 4e-8 here) are the only differences.
TOLERANCE = 1e-4


def lcm_scheduler():
    from diffusers import LCMScheduler
    # LCM's config for SD 1.5 (latent-consistency/lcm-lora-sdv1-5's scheduler_config): the SD training schedule,
    # 50 original inference steps, timestep scaling 10
    return LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True)


def test_the_lcm_sampler_takes_lcmschedulers_steps(sd1):
    sched = lcm_scheduler()
    sched.set_timesteps(STEPS)
    timesteps = [int(t) for t in sched.timesteps]
    assert timesteps == [999, 759, 499, 259]
    model_schedule = schedules.model_schedule(sd1)
    # the same training schedule
    assert torch.allclose(model_schedule.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6)
    # the LCM sampler's Automatic schedule: the scheduler's timesteps
    sigmas = schedules.get_sigmas("Automatic", STEPS, model_schedule, "LCM")
    ac = sched.alphas_cumprod.double()
    expected = torch.tensor([((1 - ac[t]) / ac[t]).sqrt().item() for t in timesteps] + [0.0], dtype=torch.float32)
    assert torch.allclose(sigmas, expected, rtol=1e-6)

    conditioner = TextConditioner(sd1, CPU)
    cond = conditioner.encode("a lighthouse at dusk")
    conds = ScheduledConds([[(STEPS, cond)]])
    denoiser = CFGDenoiser(sd1, model_schedule, conds, conds, 1.0, conditioner, CPU, torch.float32, 64, 64)
    denoiser.start_pass(STEPS)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    # diffusers: the variance-preserving latents, noise drawn by the scheduler from its generator at each step
    sample, ours_noise_gen, theirs_gen = noise.clone(), torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    theirs = []
    with torch.no_grad():
        for t in sched.timesteps:
            eps = sd1.unet(sample, t, encoder_hidden_states=cond.crossattn[None], return_dict=False)[0]
            out = sched.step(eps, t, sample, generator=theirs_gen)
            theirs.append(out.denoised)
            sample = out.prev_sample

    ours = []
    # Easel samples x = x0 + sigma * noise (k-diffusion's form): the same state is the VP latents * sqrt(1 + sigma^2)
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    result = SAMPLE_FUNCTIONS["LCM"](denoiser, x, sigmas,
                             noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=ours_noise_gen),
                             callback=lambda d: ours.append(d["denoised"]))
    assert len(ours) == len(theirs) == STEPS
    print("LCM x0 max abs differences:", [float((a - b).abs().max()) for a, b in zip(ours, theirs)])
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() < TOLERANCE, (i, (a - b).abs().max().item())
    assert (result - sample).abs().max().item() < TOLERANCE  # the last step returns the x0 prediction itself
    assert not torch.allclose(ours[0], ours[-1], atol=1e-2)  # the steps do something


def test_the_lcm_samplers_automatic_schedule_is_lcmschedulers():
    sched = lcm_scheduler()
    ms = schedules.DiscreteSchedule.from_betas()
    for steps in (1, 2, 3, 4, 6, 8, 50):
        sched.set_timesteps(steps)
        sigmas = schedules.get_sigmas("Automatic", steps, ms, "LCM")
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0
        assert [round(float(ms.sigma_to_t(s))) for s in sigmas[:-1]] == [int(t) for t in sched.timesteps], steps
    # a schedule the user picks is used as it is; past 50 steps, Automatic is the sampler's uniform one
    assert torch.equal(schedules.get_sigmas("Karras", 4, ms, "LCM"), schedules.get_sigmas("Karras", 4, ms, "Euler"))
    assert torch.equal(schedules.get_sigmas("Automatic", 60, ms, "LCM"), schedules.get_sigmas("Uniform", 60, ms, "LCM"))


# -- LCM-LoRA ------------------------------------------------------------------------------------------

# The module kinds LCM-LoRA trains in an SD 1.5 UNet (attention projections, feed-forward, proj_in/out, the resnets'
# convolutions and time embedding projections, down/upsampler convolutions), on the tiny UNet's modules.
LCM_LORA_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "up_blocks.1.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.0.conv2",
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.upsamplers.0.conv",
)
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


def lcm_lora_tensors(layout: str) -> dict[str, torch.Tensor]:
    shapes = weight_shapes("sd1")
    mods = [{"part": "unet", "module": m, "kind": "lora", "rank": RANK, "alpha": ALPHA} for m in LCM_LORA_MODULES]
    assert all(("unet", m) in shapes for m in LCM_LORA_MODULES)
    kohya = build_file("sd1", mods, seed=21)  # lora_unet_<diffusers name with _>.lora_down.weight / .alpha
    if layout == "kohya":
        return kohya
    out = {}
    for key, value in kohya.items():
        base, _, suffix = key.partition(".")
        module = next(m for m in LCM_LORA_MODULES if "lora_unet_" + m.replace(".", "_") == base)
        if suffix == "alpha":  # diffusers and PEFT files write no alpha (scale 1): it goes into the up weights here
            continue
        scale = ALPHA / RANK if suffix == "lora_up.weight" else 1.0
        if layout == "diffusers":
            out[f"unet.{module}.lora.{'up' if 'up' in suffix else 'down'}.weight"] = value * scale
        else:  # PEFT
            out[f"unet.{module}.lora_{'B' if 'up' in suffix else 'A'}.weight"] = value * scale
    return out


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "peft"])
def test_an_lcm_lora_changes_each_module_by_the_formula(sd1, tmp_path, layout):
    tensors = lcm_lora_tensors(layout)
    path = save_lora(tmp_path / "pytorch_lora_weights.safetensors", tensors)
    kohya = lcm_lora_tensors("kohya")
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    patcher = NetworkPatcher(LoadedModel(sd1))
    report = patcher.apply([ActiveNetwork(read_network_file(path), 1.0, 0.75)])[0]
    try:
        assert report.applied == len(LCM_LORA_MODULES) and report.unmatched == 0, report
        after = sd1.unet.state_dict()
        for module in LCM_LORA_MODULES:
            base = "lora_unet_" + module.replace(".", "_")
            down, up = kohya[f"{base}.lora_down.weight"], kohya[f"{base}.lora_up.weight"]
            w = before[f"{module}.weight"]
            update = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (ALPHA / RANK)
            assert torch.allclose(after[f"{module}.weight"], w + 0.75 * update, atol=1e-5, rtol=1e-5), module
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"{m}.weight" for m in LCM_LORA_MODULES}
    finally:
        patcher.apply([])
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())  # restored
