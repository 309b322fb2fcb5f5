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
from backend.engine.pipelines.common import (CFGDenoiser, JobContext, aesthetic_scores, decode_latents, encode_images,
                                             flow_guidance, format_number, image_rng, noised_latents, run_sampler,
                                             sampler_extra_args, sampler_noise, tiling)
from backend.engine.pipelines.processing import EachImage, Generation
from backend.engine.pipelines.refiner import RefinerDenoiser, check_same_latents, refiner_switch_at, short_title
from backend.engine.sampling_hooks import FIRST_PASS, HIRES_PASS

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


def run(req: Txt2ImgRequest, ctx: JobContext, each: EachImage | None = None,
        firstpass_image: Image.Image | None = None) -> GenerationResult:
    """One txt2img job; `each`: a script's prompts and seeds for each image instead of the request's;
    `firstpass_image` (the request's, A1111 1.7+): with hires. fix, the first pass is not sampled: this picture is
    upscaled and refined instead."""
    req = with_latent_size(req)  # a script's size (X/Y/Z, a prompt line) may not be a multiple of 8
    gen = Generation(req, ctx, samples_dir_key="outdir_txt2img_samples", grids_dir_key="outdir_txt2img_grids",
                     each=each)

    hires = req.enable_hr
    firstpass = firstpass_image.convert("RGB") if hires and firstpass_image is not None else None
    hr_w, hr_h = hires_size(req) if hires else (req.width, req.height)
    hr_steps = req.hr_second_pass_steps or req.steps
    hr_denoise = DEFAULT_HIRES_DENOISE if req.denoising_strength is None else float(req.denoising_strength)
    hr_upscaler = req.hr_upscaler or "Latent"
    hr_sampler_info, hr_schedule = ctx.sampling.hires_sampler, ctx.sampling.hires_schedule
    hires_sampling = hires and hr_denoise > 0
    steps_per_batch = (0 if firstpass is not None else req.steps) + (hr_steps if hires_sampling else 0)
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
        _run_batches(req, ctx, gen, hr_w, hr_h, hr_steps, hr_denoise, hr_upscaler, hr_sampler_info, hr_schedule,
                     firstpass)
    except JobInterrupted:  # Interrupt while encoding prompts or upscaling: the images finished so far are the answer
        gen.interrupted = True
    return gen.finish({"denoising_strength": hr_denoise if hires else req.denoising_strength})


def _pass_denoiser(ctx: JobContext, gen: Generation, req: Txt2ImgRequest, make, pass_name: str, hires: bool):
    """The pass's denoiser, made by `make(conditioner, schedule)` for the model the job samples with now; wrapped so
    that it hands over to the refiner when the job has one for this pass (`backend.engine.pipelines.refiner`)."""
    denoiser = make(*gen.for_model())
    switch_at = refiner_switch_at(ctx, req, pass_name, hires)
    if switch_at is None:
        return denoiser
    return RefinerDenoiser(ctx, denoiser, switch_at, req, lambda: make(*gen.for_model()), hires=hires)


def _run_batches(req: Txt2ImgRequest, ctx: JobContext, gen: Generation, hr_w: int, hr_h: int, hr_steps: int,
                 hr_denoise: float, hr_upscaler: str, hr_sampler_info, hr_schedule: str,
                 firstpass: Image.Image | None = None) -> None:
    device, options = gen.device, ctx.options
    sampler_info, schedule = gen.sampler_info, gen.schedule
    prompts, negatives = gen.prompts, gen.negatives
    hires = req.enable_hr
    hires_sampling = hires and hr_denoise > 0
    opt_f = 8
    with tiling(ctx.model, bool(req.tiling)) as gen.tiled:
        for n, idx in gen.batches():
            if ctx.switch_model is not None:  # the previous batch may have ended on the refiner or hires. checkpoint
                ctx.switch_model(None, req)
            seeds, subseeds = gen.all_seeds[idx], gen.all_subseeds[idx]
            shape = (ctx.model.latent_channels, req.height // opt_f, req.width // opt_f)
            rng = image_rng(ctx, shape, seeds, subseeds, req)
            denoiser, stop = None, None
            if firstpass is None:
                model_schedule = gen.model_schedule
                sigmas = schedules.get_sigmas(schedule, req.steps, model_schedule, sampler_info.name).to(device)
                x = rng.first().to(device) * sigmas[0]

                def first_pass(conditioner, model_schedule, idx=idx, n=len(seeds)):
                    conds = conditioner.schedules(prompts[idx], req.steps, is_negative=False)
                    unconds = conditioner.schedules(negatives[idx], req.steps, is_negative=True)
                    model = ctx.model
                    image_cond = (_txt2img_image_conditioning(ctx, n, req.width, req.height) if model.is_inpaint
                                  else None)
                    return CFGDenoiser(model, model_schedule, conds, unconds, req.cfg_scale, conditioner, device,
                                       ctx.policy.dtype, req.width, req.height, image_cond, hooks=ctx.sampling_hooks,
                                       skips=gen.uncond_skips, aesthetic_scores=aesthetic_scores(options),
                                       **flow_guidance(req, options, model))

                denoiser = _pass_denoiser(ctx, gen, req, first_pass, FIRST_PASS, hires)
                noise_sampler = sampler_noise(sampler_info, rng, x, sigmas, seeds)
                latents, stop = run_sampler(ctx, sampler_info, denoiser, x, sigmas, noise_sampler, gen.extra,
                                            gen.preview_every, gen.token_merging)
                latents = denoiser.after_sampling(latents)
                if hires and stop is None and ctx.control.interrupted():
                    stop = "interrupted"  # pressed after the first pass: its pictures are the answer

            images = None
            if hires and stop is None:
                hr_prompts = [gen.hr_prompt or p for p in prompts[idx]]  # with the request's styles
                hr_negs = [gen.hr_negative or p for p in negatives[idx]]
                # the second pass's checkpoint: hr_checkpoint_name, else the job's own (after a first-pass refiner)
                to_hires_model = lambda: _to_hires_model(ctx, gen, req)  # noqa: E731
                if hr_upscaler in LATENT_UPSCALE_MODES:
                    if firstpass is not None:  # A1111: the given picture, encoded at its own size
                        w8, h8 = max(8, firstpass.width // 8 * 8), max(8, firstpass.height // 8 * 8)
                        picture = (firstpass if (w8, h8) == firstpass.size
                                   else firstpass.resize((w8, h8), Image.Resampling.LANCZOS))
                        latents = encode_images(ctx, [picture] * len(seeds), options["sd_vae_encode_method"])
                    latents = _upscale_latent(latents, hr_w, hr_h, hr_upscaler)
                    first_model = ctx.model
                    to_hires_model()
                    check_same_latents(first_model, ctx.model, "The hires. fix checkpoint (with a Latent upscaler)")
                else:
                    first = [firstpass] * len(seeds) if firstpass is not None else decode_latents(ctx, latents)
                    try:
                        upscaled = [upscale_for_job(ctx, img, hr_upscaler, hr_w, hr_h) for img in first]
                    except JobInterrupted:  # stopped between the upscaler's tiles: keep the first pass's pictures
                        images, stop = first, "interrupted"
                    else:
                        to_hires_model()
                        latents = encode_images(ctx, upscaled, options["sd_vae_encode_method"])
                if hires_sampling and stop is None:
                    hr_rng = image_rng(ctx, (ctx.model.latent_channels, hr_h // opt_f, hr_w // opt_f), seeds, subseeds,
                                       req)
                    hr_sigmas = img2img_sigmas(hr_sampler_info, hr_schedule, gen.for_model()[1], hr_steps, hr_denoise,
                                               True).to(device)
                    x = noised_latents(ctx.model, latents, hr_rng.first().to(device), hr_sigmas[0])

                    def hires_pass(conditioner, model_schedule, n=len(seeds)):
                        hr_conds = conditioner.schedules(hr_prompts, req.steps, False, hires_steps=hr_steps)
                        hr_unconds = conditioner.schedules(hr_negs, req.steps, True, hires_steps=hr_steps)
                        model = ctx.model
                        hr_image_cond = _txt2img_image_conditioning(ctx, n, hr_w, hr_h) if model.is_inpaint else None
                        # The hooks learn from the pass name that this is the hires. fix pass.
                        return CFGDenoiser(model, model_schedule, hr_conds, hr_unconds, req.cfg_scale, conditioner,
                                           device, ctx.policy.dtype, hr_w, hr_h, hr_image_cond,
                                           hooks=ctx.sampling_hooks, pass_name=HIRES_PASS,
                                           skips=gen.uncond_skips, aesthetic_scores=aesthetic_scores(options),
                                           **flow_guidance(req, options, model))

                    denoiser = _pass_denoiser(ctx, gen, req, hires_pass, HIRES_PASS, True)
                    hr_noise = sampler_noise(hr_sampler_info, hr_rng, x, hr_sigmas, seeds, img2img_sigma_max(
                        hr_sampler_info, hr_schedule, gen.for_model()[1], hr_steps, hr_denoise, True))
                    latents, stop = run_sampler(ctx, hr_sampler_info, denoiser, x, hr_sigmas, hr_noise,
                                                sampler_extra_args(hr_sampler_info, req, options), gen.preview_every,
                                                gen.token_merging_hr)
                    latents = denoiser.after_sampling(latents)

            # The batch's final pictures, through the hooks of the pass that made them.
            if images is None:
                images = decode_latents(ctx, latents)
            if denoiser is not None:
                images = denoiser.after_decode(images)
            if req.restore_faces:
                images = restore_faces_for_job(ctx, images)
            for j, img in enumerate(images):
                gen.add_image(img, n * req.batch_size + j)
            if gen.end_batch(stop):
                break


def _to_hires_model(ctx: JobContext, gen: Generation, req: Txt2ImgRequest) -> None:
    """The second pass's checkpoint: hr_checkpoint_name (infotext "Hires checkpoint"), else the job's own (after a
    refiner in the first pass)."""
    if ctx.switch_model is None:
        return
    hires_file = ctx.switch_model("hires", req)
    if hires_file.path != ctx.checkpoint.path:
        ctx.extra_params["Hires checkpoint"] = short_title(hires_file)
    gen.for_model()  # its conditioner made (and the model tiled when the job tiles) before it encodes


def _txt2img_image_conditioning(ctx: JobContext, n: int, width: int, height: int) -> torch.Tensor:
    """Inpainting UNets get 5 extra channels; for txt2img A1111 gives a full mask over a grey image."""
    grey = Image.new("RGB", (width, height), (127, 127, 127))
    masked = encode_images(ctx, [grey]).repeat(n, 1, 1, 1)
    mask = torch.ones(n, 1, masked.shape[2], masked.shape[3], device=masked.device)
    return torch.cat([mask, masked], dim=1)
