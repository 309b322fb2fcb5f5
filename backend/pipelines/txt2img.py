"""txt2img, with AUTOMATIC1111's seeds, batches, prompt schedules and hires. fix.

    validate -> seeds -> for each batch: encode prompts, draw noise, sample,
    (hires. fix: upscale, re-noise, sample again), decode, save -> grid -> result
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .. import samplers
from ..conditioning import TextConditioner
from ..errors import UserError
from ..images import day_folder, encode_png, image_grid, save_image
from ..rng import ImageRNG, fix_seed
from ..schemas import GeneratedImage, GenerationResult, Txt2ImgRequest
from .common import (VERSION, CFGDenoiser, JobContext, decode_latents, encode_images, format_number, resolve_sampler,
                     run_sampler, sampler_extra_args, tiling, validate_size)

LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
HIRES_UPSCALERS = list(LATENT_UPSCALE_MODES) + list(IMAGE_UPSCALERS)
DEFAULT_HIRES_DENOISE = 0.7


def validate(req: Txt2ImgRequest) -> None:
    validate_size(req.width, req.height)
    if not 1 <= req.steps <= 150:
        raise UserError(f"steps must be between 1 and 150, got {req.steps}.")
    if not 1 <= req.batch_size <= 64:
        raise UserError(f"batch_size must be between 1 and 64, got {req.batch_size}.")
    if not 1 <= req.n_iter <= 1000:
        raise UserError(f"n_iter (batch count) must be between 1 and 1000, got {req.n_iter}.")
    if not 0 <= req.cfg_scale <= 100:
        raise UserError(f"cfg_scale must be between 0 and 100, got {req.cfg_scale}.")
    if not 0 <= req.subseed_strength <= 1:
        raise UserError(f"subseed_strength must be between 0 and 1, got {req.subseed_strength}.")
    if req.enable_hr:
        if req.hr_upscaler and req.hr_upscaler not in HIRES_UPSCALERS:
            raise UserError(f"Unknown hires upscaler {req.hr_upscaler!r}. Available: {', '.join(HIRES_UPSCALERS)}")
        if req.hr_second_pass_steps < 0 or req.hr_second_pass_steps > 150:
            raise UserError("hr_second_pass_steps must be between 0 and 150.")
        w, h = hires_size(req)
        validate_size(w, h, "hires. fix ")
        if req.denoising_strength is not None and not 0 <= req.denoising_strength <= 1:
            raise UserError("denoising_strength must be between 0 and 1.")


def hires_size(req: Txt2ImgRequest) -> tuple[int, int]:
    """The hires. fix target size (A1111 rules: scale by, or resize to with the missing side kept in ratio)."""
    if not req.hr_resize_x and not req.hr_resize_y:
        w, h = int(req.width * req.hr_scale), int(req.height * req.hr_scale)
    elif not req.hr_resize_y:
        w, h = req.hr_resize_x, req.hr_resize_x * req.height // req.width
    elif not req.hr_resize_x:
        w, h = req.hr_resize_y * req.width // req.height, req.hr_resize_y
    else:
        w, h = req.hr_resize_x, req.hr_resize_y
    return w // 8 * 8, h // 8 * 8


def _resize_cover(img: Image.Image, w: int, h: int, resample) -> Image.Image:
    """Scale to cover w x h, keeping the aspect ratio, then crop the middle (A1111 'crop and resize')."""
    ratio = max(w / img.width, h / img.height)
    sw, sh = max(w, round(img.width * ratio)), max(h, round(img.height * ratio))
    img = img.resize((sw, sh), resample)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def _upscale_latent(latent: torch.Tensor, w: int, h: int, mode: str) -> torch.Tensor:
    interp, antialias = LATENT_UPSCALE_MODES[mode]
    ratio = max(w / (latent.shape[3] * 8), h / (latent.shape[2] * 8))
    sw, sh = max(w // 8, round(latent.shape[3] * ratio)), max(h // 8, round(latent.shape[2] * ratio))
    kwargs = {"antialias": antialias} if interp in ("bilinear", "bicubic") else {}
    up = F.interpolate(latent, size=(sh, sw), mode=interp, **kwargs)
    top, left = (sh - h // 8) // 2, (sw - w // 8) // 2
    return up[:, :, top:top + h // 8, left:left + w // 8]


def img2img_sigmas(sampler_info, schedule: str, model_schedule, steps: int, denoise: float, fix_steps: bool) -> torch.Tensor:
    """Sigmas for a pass that starts from an image (A1111's setup_img2img_steps)."""
    if fix_steps:
        total = int(steps / min(denoise, 0.999)) if denoise > 0 else 0
        t_enc = steps - 1
    else:
        total = steps
        t_enc = int(min(denoise, 0.999) * steps)
    sigmas = samplers.get_sigmas(schedule, max(total, 1), model_schedule, sampler_info.name)
    return sigmas[max(total, 1) - t_enc - 1:]


def run(req: Txt2ImgRequest, ctx: JobContext) -> GenerationResult:
    validate(req)
    model, device, options = ctx.model, ctx.policy.device, ctx.options
    sampler_info, schedule = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler, options.get("default_sampler", "Euler a"))
    clip_skip = int(req.override_settings.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1)))
    model_schedule = samplers.DiscreteSchedule(model.alphas_cumprod)
    extra = sampler_extra_args(sampler_info, req, options)

    total_images = req.batch_size * req.n_iter
    seed = fix_seed(req.seed)
    subseed = fix_seed(req.subseed)
    all_seeds = [seed + (i if req.subseed_strength == 0 else 0) for i in range(total_images)]
    all_subseeds = [subseed + i for i in range(total_images)]
    prompts = [req.prompt] * total_images
    negatives = [req.negative_prompt] * total_images

    hires = req.enable_hr
    hr_w, hr_h = hires_size(req) if hires else (req.width, req.height)
    hr_steps = req.hr_second_pass_steps or req.steps
    hr_denoise = DEFAULT_HIRES_DENOISE if req.denoising_strength is None else float(req.denoising_strength)
    hr_upscaler = req.hr_upscaler or "Latent"
    hr_sampler_info, hr_schedule = (resolve_sampler(req.hr_sampler_name, req.hr_scheduler or schedule, sampler_info.name)
                                    if hires and req.hr_sampler_name else (sampler_info, schedule))
    hires_sampling = hires and hr_denoise > 0

    conditioner = TextConditioner(model, device, clip_skip)
    preview_every = int(options.get("show_progress_every_n_steps", 2)) if options.get("live_previews_enable", True) else -1
    steps_per_batch = req.steps + (hr_steps if hires_sampling else 0)
    ctx.control.begin(req.n_iter, steps_per_batch * req.n_iter)

    params_base = {
        "Steps": req.steps, "Sampler": sampler_info.name, "Schedule type": schedule,
        "CFG scale": format_number(req.cfg_scale),
        "Size": f"{req.width}x{req.height}",
        "Model hash": ctx.checkpoint.shorthash, "Model": ctx.checkpoint.model_name,
        "VAE hash": ctx.vae.shorthash if ctx.vae else None, "VAE": ctx.vae.model_name if ctx.vae else None,
        "Variation seed strength": format_number(req.subseed_strength) if req.subseed_strength > 0 else None,
        "Seed resize from": f"{req.seed_resize_from_w}x{req.seed_resize_from_h}" if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 else None,
        "Denoising strength": format_number(hr_denoise) if hires else None,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Tiling": True if req.tiling else None,
    }
    if hires:
        if req.hr_resize_x or req.hr_resize_y:
            params_base["Hires resize"] = f"{hr_w}x{hr_h}"
        else:
            params_base["Hires upscale"] = format_number(req.hr_scale)
        params_base["Hires steps"] = req.hr_second_pass_steps or None
        params_base["Hires upscaler"] = hr_upscaler
        if req.hr_sampler_name:
            params_base["Hires sampler"] = hr_sampler_info.name
        if req.hr_prompt and req.hr_prompt != req.prompt:
            params_base["Hires prompt"] = req.hr_prompt
        if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
            params_base["Hires negative prompt"] = req.hr_negative_prompt

    from ..infotext import build_infotext  # local: keeps import order simple for the worker

    def infotext_for(i: int) -> str:
        params = dict(params_base)
        params["Seed"] = all_seeds[i]
        params["Variation seed"] = all_subseeds[i] if req.subseed_strength > 0 else None
        params["Version"] = VERSION
        order = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed"]
        ordered = {k: params.pop(k) for k in order}
        ordered.update(params)
        return build_infotext(prompts[i], negatives[i], ordered)

    save_samples = not req.do_not_save_samples and options.get("samples_save", True)
    out_dir = day_folder(_outdir(ctx, "outdir_txt2img_samples"), options.get("save_to_dirs", True))
    fmt = options.get("samples_format", "png")
    pattern = options.get("samples_filename_pattern", "")

    outputs: list[GeneratedImage] = []
    pil_images: list[Image.Image] = []
    interrupted = False
    opt_f = 8
    with tiling(model, bool(req.tiling)):
        for n in range(req.n_iter):
            if ctx.control.interrupted():
                interrupted = True
                break
            ctx.control.set_job(n)
            idx = slice(n * req.batch_size, (n + 1) * req.batch_size)
            seeds, subseeds = all_seeds[idx], all_subseeds[idx]
            conds = conditioner.schedules(prompts[idx], req.steps, is_negative=False)
            unconds = conditioner.schedules(negatives[idx], req.steps, is_negative=True)

            shape = (4, req.height // opt_f, req.width // opt_f)
            rng = ImageRNG(shape, seeds, subseeds, req.subseed_strength, req.seed_resize_from_h, req.seed_resize_from_w)
            sigmas = samplers.get_sigmas(schedule, req.steps, model_schedule, sampler_info.name).to(device)
            x = rng.first().to(device) * sigmas[0]
            image_cond = _txt2img_image_conditioning(ctx, len(seeds), req.width, req.height) if model.is_inpaint else None
            denoiser = CFGDenoiser(model, model_schedule, conds, unconds, req.cfg_scale, conditioner, device,
                                   ctx.policy.dtype, req.width, req.height, image_cond)
            noise_sampler = lambda _s, _sn, rng=rng: rng.next().to(device)  # noqa: E731
            latents, stop = run_sampler(ctx, sampler_info, denoiser, x, sigmas, noise_sampler, extra, preview_every)

            if hires and stop is None:
                hr_prompts = [req.hr_prompt or p for p in prompts[idx]]
                hr_negs = [req.hr_negative_prompt or p for p in negatives[idx]]
                if hr_upscaler in LATENT_UPSCALE_MODES:
                    latents = _upscale_latent(latents, hr_w, hr_h, hr_upscaler)
                else:
                    first = decode_latents(ctx, latents)
                    upscaled = [_resize_cover(img, hr_w, hr_h, IMAGE_UPSCALERS[hr_upscaler]) for img in first]
                    latents = encode_images(ctx, upscaled)
                if hires_sampling:
                    hr_conds = conditioner.schedules(hr_prompts, req.steps, False, hires_steps=hr_steps)
                    hr_unconds = conditioner.schedules(hr_negs, req.steps, True, hires_steps=hr_steps)
                    hr_rng = ImageRNG((4, hr_h // opt_f, hr_w // opt_f), seeds, subseeds, req.subseed_strength,
                                      req.seed_resize_from_h, req.seed_resize_from_w)
                    hr_sigmas = img2img_sigmas(hr_sampler_info, hr_schedule, model_schedule, hr_steps, hr_denoise, True).to(device)
                    x = latents + hr_rng.first().to(device) * hr_sigmas[0]
                    hr_image_cond = _txt2img_image_conditioning(ctx, len(seeds), hr_w, hr_h) if model.is_inpaint else None
                    hr_denoiser = CFGDenoiser(model, model_schedule, hr_conds, hr_unconds, req.cfg_scale, conditioner,
                                              device, ctx.policy.dtype, hr_w, hr_h, hr_image_cond)
                    hr_noise = lambda _s, _sn, rng=hr_rng: rng.next().to(device)  # noqa: E731
                    latents, stop = run_sampler(ctx, hr_sampler_info, hr_denoiser, x, hr_sigmas, hr_noise,
                                                sampler_extra_args(hr_sampler_info, req, options), preview_every)

            images = decode_latents(ctx, latents)
            for j, img in enumerate(images):
                i = n * req.batch_size + j
                text = infotext_for(i)
                path = None
                if save_samples:
                    path = save_image(img, out_dir, seed=all_seeds[i], infotext=text, fmt=fmt, pattern=pattern,
                                      name_values=_name_values(req, ctx, all_seeds[i], sampler_info.name),
                                      with_pnginfo=options.get("enable_pnginfo", True))
                outputs.append(GeneratedImage(png=encode_png(img, text), infotext=text, seed=all_seeds[i],
                                              subseed=all_subseeds[i], prompt=prompts[i], negative_prompt=negatives[i],
                                              saved_path=str(path) if path else None))
                pil_images.append(img)
            if stop == "interrupted":
                interrupted = True
                break
            if stop == "skipped":
                ctx.control.clear_skip()

    if len(pil_images) > 1 and not req.do_not_save_grid and (options.get("return_grid", True) or options.get("grid_save", True)):
        grid = image_grid(pil_images)
        text = infotext_for(0)
        path = None
        if options.get("grid_save", True):
            grid_dir = day_folder(_outdir(ctx, "outdir_txt2img_grids"), options.get("save_to_dirs", True))
            path = save_image(grid, grid_dir, seed=all_seeds[0], infotext=text, fmt=fmt, basename="grid",
                              with_pnginfo=options.get("enable_pnginfo", True))
        if options.get("return_grid", True):
            outputs.insert(0, GeneratedImage(png=encode_png(grid, text), infotext=text, seed=all_seeds[0],
                                             subseed=all_subseeds[0], prompt=prompts[0], negative_prompt=negatives[0],
                                             saved_path=str(path) if path else None, is_grid=True))

    produced = [o for o in outputs if not o.is_grid]
    info = {
        "prompt": req.prompt, "all_prompts": [o.prompt for o in produced],
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [o.negative_prompt for o in produced],
        "seed": seed, "all_seeds": [o.seed for o in produced], "subseed": subseed,
        "all_subseeds": [o.subseed for o in produced], "subseed_strength": req.subseed_strength,
        "width": req.width, "height": req.height, "sampler_name": sampler_info.name, "scheduler": schedule,
        "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "restore_faces": bool(req.restore_faces),
        "sd_model_name": ctx.checkpoint.model_name, "sd_model_hash": ctx.checkpoint.shorthash,
        "sd_vae_name": ctx.vae.model_name if ctx.vae else None, "sd_vae_hash": ctx.vae.shorthash if ctx.vae else None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": hr_denoise if hires else req.denoising_strength, "extra_generation_params": {},
        "index_of_first_image": 1 if outputs and outputs[0].is_grid else 0,
        "infotexts": [o.infotext for o in outputs], "styles": req.styles, "job_timestamp": "",
        "clip_skip": clip_skip, "is_using_inpainting_conditioning": bool(model.is_inpaint), "version": VERSION,
    }
    return GenerationResult(images=outputs, info=info, warnings=list(ctx.warnings), interrupted=interrupted)


def _outdir(ctx: JobContext, key: str):
    from pathlib import Path
    target = Path(ctx.options.get(key))
    return target if target.is_absolute() else Path(ctx.outputs_root) / target


def _name_values(req, ctx, seed, sampler_name) -> dict:
    return {"seed": seed, "prompt": req.prompt, "steps": req.steps, "cfg": format_number(req.cfg_scale),
            "sampler": sampler_name, "width": req.width, "height": req.height,
            "model_name": ctx.checkpoint.model_name, "model_hash": ctx.checkpoint.shorthash}


def _txt2img_image_conditioning(ctx: JobContext, n: int, width: int, height: int) -> torch.Tensor:
    """Inpainting UNets get 5 extra channels; for txt2img A1111 gives a full mask over a grey image."""
    grey = Image.new("RGB", (width, height), (127, 127, 127))
    masked = encode_images(ctx, [grey]).repeat(n, 1, 1, 1)
    mask = torch.ones(n, 1, masked.shape[2], masked.shape[3], device=masked.device)
    return torch.cat([mask, masked], dim=1)
