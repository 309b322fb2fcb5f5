"""txt2img, with AUTOMATIC1111's seeds, batches, prompt schedules and hires. fix.

    seeds -> for each batch: encode prompts, draw noise, sample,
    (hires. fix: upscale, re-noise, sample again), decode, save -> grid -> result

The request was checked and its samplers resolved by the app (`backend.core.request_checks`, `ctx.sampling`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from backend.engine import schedules
from backend.core.errors import JobInterrupted
from backend.core.request_checks import LATENT_UPSCALE_MODES, hires_size, with_latent_size
from backend.engine.postprocess.face_restore import restore_faces_for_job
from backend.engine.postprocess.upscalers import upscale_for_job
from backend.core.schemas import GenerationResult, Txt2ImgRequest
from backend.engine.pipelines.common import (CFGDenoiser, JobContext, decode_latents, encode_images, format_number,
                                             image_rng, run_sampler, sampler_extra_args, sampler_noise, tiling)
from backend.engine.pipelines.processing import EachImage, Generation
from backend.engine.sampling_hooks import HIRES_PASS

IMAGE_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
HIRES_UPSCALERS = list(LATENT_UPSCALE_MODES) + list(IMAGE_UPSCALERS)
DEFAULT_HIRES_DENOISE = 0.7


def _upscale_latent(latent: torch.Tensor, w: int, h: int, mode: str) -> torch.Tensor:
    interp, antialias = LATENT_UPSCALE_MODES[mode]
    ratio = max(w / (latent.shape[3] * 8), h / (latent.shape[2] * 8))
    sw, sh = max(w // 8, round(latent.shape[3] * ratio)), max(h // 8, round(latent.shape[2] * ratio))
    kwargs = {"antialias": antialias} if interp in ("bilinear", "bicubic") else {}
    up = F.interpolate(latent, size=(sh, sw), mode=interp, **kwargs)
    top, left = (sh - h // 8) // 2, (sw - w // 8) // 2
    return up[:, :, top:top + h // 8, left:left + w // 8]


def _img2img_steps(steps: int, denoise: float, fix_steps: bool) -> tuple[int, int]:
    """(steps of the whole schedule, index of the last step run) as A1111's setup_img2img_steps."""
    if fix_steps:
        total = int(steps / min(denoise, 0.999)) if denoise > 0 else 0
        return max(total, 1), steps - 1
    return max(steps, 1), int(min(denoise, 0.999) * steps)


def img2img_sigmas(sampler_info, schedule: str, model_schedule, steps: int, denoise: float, fix_steps: bool) -> torch.Tensor:
    """Sigmas for a pass that starts from an image (A1111's setup_img2img_steps): the end of a longer schedule."""
    total, t_enc = _img2img_steps(steps, denoise, fix_steps)
    sigmas = schedules.get_sigmas(schedule, total, model_schedule, sampler_info.name)
    return sigmas[total - t_enc - 1:]


def img2img_sigma_max(sampler_info, schedule: str, model_schedule, steps: int, denoise: float, fix_steps: bool) -> float:
    """The top of the whole schedule `img2img_sigmas` cuts its sigmas from (where A1111's Brownian tree starts)."""
    total, _ = _img2img_steps(steps, denoise, fix_steps)
    return float(schedules.get_sigmas(schedule, total, model_schedule, sampler_info.name).max())


def run(req: Txt2ImgRequest, ctx: JobContext, each: EachImage | None = None) -> GenerationResult:
    """One txt2img job; `each`: a script's prompts and seeds for each image instead of the request's."""
    req = with_latent_size(req)  # a script's size (X/Y/Z, a prompt line) may not be a multiple of 8
    gen = Generation(req, ctx, samples_dir_key="outdir_txt2img_samples", grids_dir_key="outdir_txt2img_grids",
                     each=each)

    hires = req.enable_hr
    hr_w, hr_h = hires_size(req) if hires else (req.width, req.height)
    hr_steps = req.hr_second_pass_steps or req.steps
    hr_denoise = DEFAULT_HIRES_DENOISE if req.denoising_strength is None else float(req.denoising_strength)
    hr_upscaler = req.hr_upscaler or "Latent"
    hr_sampler_info, hr_schedule = ctx.sampling.hires_sampler, ctx.sampling.hires_schedule
    hires_sampling = hires and hr_denoise > 0
    steps_per_batch = req.steps + (hr_steps if hires_sampling else 0)
    ctx.control.begin(req.n_iter, steps_per_batch * req.n_iter)

    if hires:
        gen.params["Denoising strength"] = format_number(hr_denoise)
        if req.hr_resize_x or req.hr_resize_y:
            gen.params["Hires resize"] = f"{hr_w}x{hr_h}"
        else:
            gen.params["Hires upscale"] = format_number(req.hr_scale)
        gen.params["Hires steps"] = req.hr_second_pass_steps or None
        gen.params["Hires upscaler"] = hr_upscaler
        if req.hr_sampler_name:
            gen.params["Hires sampler"] = hr_sampler_info.name
        if gen.hr_prompt and gen.hr_prompt != gen.prompts[0]:
            gen.params["Hires prompt"] = gen.hr_prompt
        if gen.hr_negative and gen.hr_negative != gen.negatives[0]:
            gen.params["Hires negative prompt"] = gen.hr_negative
        if gen.token_merging_hr:
            gen.params["Token merging ratio hr"] = format_number(gen.token_merging_hr)

    try:
        _run_batches(req, ctx, gen, hr_w, hr_h, hr_steps, hr_denoise, hr_upscaler, hr_sampler_info, hr_schedule)
    except JobInterrupted:  # Interrupt while encoding prompts or upscaling: the images finished so far are the answer
        gen.interrupted = True
    return gen.finish({"denoising_strength": hr_denoise if hires else req.denoising_strength})


def _run_batches(req: Txt2ImgRequest, ctx: JobContext, gen: Generation, hr_w: int, hr_h: int, hr_steps: int,
                 hr_denoise: float, hr_upscaler: str, hr_sampler_info, hr_schedule: str) -> None:
    model, device, options = ctx.model, gen.device, ctx.options
    sampler_info, schedule, model_schedule = gen.sampler_info, gen.schedule, gen.model_schedule
    conditioner, prompts, negatives = gen.conditioner, gen.prompts, gen.negatives
    hires = req.enable_hr
    hires_sampling = hires and hr_denoise > 0
    opt_f = 8
    with tiling(model, bool(req.tiling)):
        for n, idx in gen.batches():
            seeds, subseeds = gen.all_seeds[idx], gen.all_subseeds[idx]
            conds = conditioner.schedules(prompts[idx], req.steps, is_negative=False)
            unconds = conditioner.schedules(negatives[idx], req.steps, is_negative=True)

            shape = (4, req.height // opt_f, req.width // opt_f)
            rng = image_rng(ctx, shape, seeds, subseeds, req)
            sigmas = schedules.get_sigmas(schedule, req.steps, model_schedule, sampler_info.name).to(device)
            x = rng.first().to(device) * sigmas[0]
            image_cond = _txt2img_image_conditioning(ctx, len(seeds), req.width, req.height) if model.is_inpaint else None
            denoiser = CFGDenoiser(model, model_schedule, conds, unconds, req.cfg_scale, conditioner, device,
                                   ctx.policy.dtype, req.width, req.height, image_cond, hooks=ctx.sampling_hooks,
                                   skips=gen.uncond_skips)
            noise_sampler = sampler_noise(sampler_info, rng, x, sigmas, seeds)
            latents, stop = run_sampler(ctx, sampler_info, denoiser, x, sigmas, noise_sampler, gen.extra, gen.preview_every,
                                        gen.token_merging)
            latents = denoiser.after_sampling(latents)
            if hires and stop is None and ctx.control.interrupted():
                stop = "interrupted"  # pressed after the first pass: its pictures are the answer

            images = None
            if hires and stop is None:
                hr_prompts = [gen.hr_prompt or p for p in prompts[idx]]  # with the request's styles
                hr_negs = [gen.hr_negative or p for p in negatives[idx]]
                if hr_upscaler in LATENT_UPSCALE_MODES:
                    latents = _upscale_latent(latents, hr_w, hr_h, hr_upscaler)
                else:
                    first = decode_latents(ctx, latents)
                    try:
                        upscaled = [upscale_for_job(ctx, img, hr_upscaler, hr_w, hr_h) for img in first]
                    except JobInterrupted:  # stopped between the upscaler's tiles: keep the first pass's pictures
                        images, stop = first, "interrupted"
                    else:
                        latents = encode_images(ctx, upscaled)
                if hires_sampling and stop is None:
                    hr_conds = conditioner.schedules(hr_prompts, req.steps, False, hires_steps=hr_steps)
                    hr_unconds = conditioner.schedules(hr_negs, req.steps, True, hires_steps=hr_steps)
                    hr_rng = image_rng(ctx, (4, hr_h // opt_f, hr_w // opt_f), seeds, subseeds, req)
                    hr_sigmas = img2img_sigmas(hr_sampler_info, hr_schedule, model_schedule, hr_steps, hr_denoise, True).to(device)
                    x = latents + hr_rng.first().to(device) * hr_sigmas[0]
                    hr_image_cond = _txt2img_image_conditioning(ctx, len(seeds), hr_w, hr_h) if model.is_inpaint else None
                    # The hooks learn from the pass name that this is the hires. fix pass.
                    denoiser = CFGDenoiser(model, model_schedule, hr_conds, hr_unconds, req.cfg_scale, conditioner,
                                           device, ctx.policy.dtype, hr_w, hr_h, hr_image_cond, hooks=ctx.sampling_hooks,
                                           pass_name=HIRES_PASS, skips=gen.uncond_skips)
                    hr_noise = sampler_noise(hr_sampler_info, hr_rng, x, hr_sigmas, seeds, img2img_sigma_max(
                        hr_sampler_info, hr_schedule, model_schedule, hr_steps, hr_denoise, True))
                    latents, stop = run_sampler(ctx, hr_sampler_info, denoiser, x, hr_sigmas, hr_noise,
                                                sampler_extra_args(hr_sampler_info, req, options), gen.preview_every,
                                                gen.token_merging_hr)
                    latents = denoiser.after_sampling(latents)

            # The batch's final pictures, through the hooks of the pass that made them.
            images = denoiser.after_decode(decode_latents(ctx, latents) if images is None else images)
            if req.restore_faces:
                images = restore_faces_for_job(ctx, images)
            for j, img in enumerate(images):
                gen.add_image(img, n * req.batch_size + j)
            if gen.end_batch(stop):
                break


def _txt2img_image_conditioning(ctx: JobContext, n: int, width: int, height: int) -> torch.Tensor:
    """Inpainting UNets get 5 extra channels; for txt2img A1111 gives a full mask over a grey image."""
    grey = Image.new("RGB", (width, height), (127, 127, 127))
    masked = encode_images(ctx, [grey]).repeat(n, 1, 1, 1)
    mask = torch.ones(n, 1, masked.shape[2], masked.shape[3], device=masked.device)
    return torch.cat([mask, masked], dim=1)
