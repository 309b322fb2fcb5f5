"""img2img, sketch, inpaint (both checkpoint kinds), outpainting and folder batches, with A1111's semantics.

    prepare the mask (invert, blur, "only masked" crop) -> resize/crop the image
    -> fill masked content -> encode -> noise to the denoising strength -> sample
    with the kept region pinned in latent space -> decode -> paste the untouched
    pixels back through the overlay -> save.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from backend.engine import image_ops
from backend.core.errors import JobInterrupted, UserError
from backend.core.image_codec import folder_images, open_folder_image
from backend.core.images import save_image_or_warn
from backend.core.paths import IMAGE_EXTENSIONS
from backend.engine.postprocess.face_restore import restore_faces_for_job
from backend.core.request_checks import (LATENT_RESIZE, RESIZE_MODES, is_sd_upscale, outpainting_args, resize_mode_index,
                              validate_size, with_latent_size)
from backend.core.schemas import GenerationResult, Img2ImgRequest
from backend.engine.pipelines.common import (CFGDenoiser, JobContext, aesthetic_scores, decode_latents, encode_images,
                                             flow_guidance, noised_latents,
                                             encode_tensor, format_number, image_rng, image_to_tensor, run_sampler,
                                             sampler_noise, tiling)
from backend.engine.pipelines import sd_upscale
from backend.engine.pipelines.color_correction import apply_color_correction, correction_target
from backend.engine.pipelines.processing import EachImage, Generation
from backend.engine.pipelines.txt2img import img2img_sigma_max, img2img_sigmas
from backend.engine.pipelines.refiner import RefinerDenoiser, refiner_switch_at
from backend.engine.sampling_hooks import FIRST_PASS, SamplingHook, StepState

log = logging.getLogger("easel.img2img")

class InpaintMaskReplacement(SamplingHook):
    """A job hook (an always-on script's, e.g. the soft-inpainting extension's) that replaces the inpainting latent
    mask: `latent_mask(init, change)` gets the init latent and the blurred change map (never rounded) and returns
    the hook used instead of `LatentMask`. It changes nothing else in sampling."""

    def latent_mask(self, init_latent: torch.Tensor, change: torch.Tensor) -> SamplingHook:
        raise NotImplementedError


def mask_replacement(ctx: JobContext) -> InpaintMaskReplacement | None:
    return next((h for h in ctx.sampling_hooks if isinstance(h, InpaintMaskReplacement)), None)


@dataclass
class PreparedMask:
    """The mask as each stage needs it."""

    for_overlay: Image.Image  # blurred, at the size of the overlay (the original for "Only masked")
    processing: Image.Image  # blurred, cropped/resized to width x height: what the model changes
    region: tuple[int, int, int, int] | None  # "Only masked" crop box in the original image
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) to paste the result back into


def resize_init_image(ctx, mode: int, img: Image.Image, w: int, h: int) -> Image.Image:
    """An init image resized to w x h by the resize mode (A1111's `images.resize_image`): when it must grow, the
    upscaler of the setting `upscaler_for_img2img` enlarges it first (None: a Lanczos resize only). An upscaler
    that is not there is passed over with a warning (A1111 stores any name and falls back too)."""
    name = str(ctx.options["upscaler_for_img2img"] or "None")
    if name != "None" and mode != LATENT_RESIZE and img.mode != "L" and img.size != (w, h):
        ratio = (min if mode == 2 else max)(w / img.width, h / img.height)  # Resize and fill: the fitted size
        if ratio > 1:
            from backend.engine.postprocess.upscalers import upscale_for_job
            try:
                img = upscale_for_job(ctx, img, name, round(img.width * ratio), round(img.height * ratio))
            except UserError as exc:
                warning = f"Upscaler for img2img: {exc.message} The init image was resized with Lanczos."
                if warning not in ctx.warnings:
                    ctx.warnings.append(warning)
    return image_ops.resize_image(mode, img, w, h)


def prepare_mask(mask: Image.Image, image_size: tuple[int, int], req: Img2ImgRequest, mode: int) -> PreparedMask:
    m = image_ops.binary_mask(mask, req.mask_round)
    if m.size != image_size:  # A1111 resizes a mask of another size to the image
        m = m.resize(image_size, Image.Resampling.LANCZOS)
        if req.mask_round:
            m = m.point(lambda v: 255 if v > 128 else 0)
    if req.inpainting_mask_invert:
        m = m.point(lambda v: 255 - v)
    if m.getextrema()[1] == 0:
        raise UserError("The mask is empty: paint the area to change"
                        + (" (with 'Inpaint not masked', the mask covers the whole image)." if req.inpainting_mask_invert else "."))
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
    blurred = image_ops.blur_mask(m, blur_x, blur_y)
    if req.inpaint_full_res:
        region = image_ops.crop_region(blurred, req.inpaint_full_res_padding)
        region = image_ops.expand_to_ratio(region, req.width, req.height, *image_size)
        x1, y1, x2, y2 = region
        processing = image_ops.resize_image(2, blurred.crop(region), req.width, req.height)
        return PreparedMask(blurred, processing, region, (x1, y1, x2 - x1, y2 - y1))
    resized = image_ops.resize_image(0 if mode == LATENT_RESIZE else mode, blurred, req.width, req.height)
    return PreparedMask(resized, resized, None, None)


class LatentMask(SamplingHook):
    """The inpainting hook: pins the kept region to the init latent (A1111's mask/nmask blend), on the
    prediction of every model call (`after_denoise`) and on the pass's final latents (`after_sampling`)."""

    def __init__(self, init_latent: torch.Tensor, change: torch.Tensor):
        self.init = init_latent
        self.change = change  # 1 where the model may change the latent, 0 where it is kept (blurred edges between)

    def free(self, state: StepState) -> torch.Tensor:
        """How much of each latent the model's prediction replaces at this step."""
        return self.change

    def after_denoise(self, state: StepState, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        free = self.free(state)
        return self.init * (1 - free) + denoised * free

    def after_sampling(self, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        return self.init * (1 - self.change) + latents * self.change


class SoftInpainting(LatentMask):
    """The soft inpainting hook (the built-in extension soft-inpainting, `SoftInpaintingMask`): the change map keeps its blurred values and
    a latent joins the denoising only once the pass's remaining fraction falls below its mask value (differential
    diffusion), so weakly masked edges change a little and the transition is smooth; unmasked latents never change."""

    def free(self, state: StepState) -> torch.Tensor:
        return (self.change > 1 - (state.step + 1) / max(1, state.total_steps)).to(self.init.dtype)

    def after_sampling(self, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        free = (self.change > 0).to(self.init.dtype)
        return self.init * (1 - free) + latents * free


class SoftInpaintingMask(InpaintMaskReplacement):
    """What the always-on script "soft inpainting" adds to an img2img job: `SoftInpainting` instead of the mask."""

    def latent_mask(self, init_latent: torch.Tensor, change: torch.Tensor) -> SamplingHook:
        return SoftInpainting(init_latent, change)


def run(req: Img2ImgRequest, ctx: JobContext, init_images: list[Image.Image], mask: Image.Image | None,
        samples_dir: Path | None = None, color_from: list[Image.Image] | None = None,
        each: EachImage | None = None) -> GenerationResult:
    """One img2img job on `init_images` (at least one) and `mask`; `req` was checked by the app
    (`request_checks.check_img2img`, `check_img2img_inputs`). With the setting `img2img_color_correction` each
    output takes the colours of its (resized, filled) input, as A1111's; `color_from`: the pictures whose colours
    the outputs take instead (Loopback: the chain's first picture); `each`: a script's prompts and seeds for each
    image instead of the request's."""
    req = with_latent_size(req)  # a script's size (X/Y/Z, a prompt line) may not be a multiple of 8
    if is_sd_upscale(req):
        return sd_upscale.run(req, ctx, init_images, mask, samples_dir)
    mode = resize_mode_index(req.resize_mode)
    images = [image_ops.flatten(img) for img in init_images]
    fill = req.inpainting_fill
    outpaint = outpainting_args(req)
    if outpaint is not None:
        pixels, blur, fill, directions = outpaint
        grown = [image_ops.grow_canvas(img, pixels, directions, blur) for img in images]
        images = [g[0] for g in grown]
        mask = grown[0][1]
        w, h = images[0].size
        validate_size(w, h, "outpainted ")
        req = req.model_copy(update={"width": w, "height": h, "mask_blur": blur, "inpaint_full_res": False,
                                     "inpainting_mask_invert": 0, "inpainting_fill": fill})
    if mask is not None and mode == LATENT_RESIZE:
        mode = 0  # the overlay needs the image at the output size
    if len(images) > 1:
        req = req.model_copy(update={"batch_size": len(images)})
        base = images[0].size
        images = [im if im.size == base else im.resize(base, Image.Resampling.LANCZOS) for im in images]
    soft = mask_replacement(ctx) is not None and mask is not None

    gen = Generation(req, ctx, samples_dir_key="outdir_img2img_samples", grids_dir_key="outdir_img2img_grids",
                     samples_dir=samples_dir, each=each)
    model, device = ctx.model, gen.device
    if ctx.options["save_init_img"]:
        gen.params["Init image hash"] = save_init_images(gen, images)
    prepared = prepare_mask(mask, images[0].size, req, mode) if mask is not None else None

    processed, overlays = [], []
    for img in images:
        if (prepared is None or prepared.region is None) and mode != LATENT_RESIZE:
            img = resize_init_image(ctx, mode, img, req.width, req.height)
        if prepared is not None:
            overlays.append(image_ops.overlay_of(img, prepared.for_overlay))
            if prepared.region is not None:
                img = resize_init_image(ctx, 2, img.crop(prepared.region), req.width, req.height)
            if fill == 0:
                img = image_ops.fill_masked(img, prepared.processing)
        processed.append(img)
    color_targets = _color_targets(ctx, color_from if color_from is not None else processed)
    if len(processed) == 1:
        processed, overlays = processed * req.batch_size, overlays * req.batch_size
    if len(color_targets) == 1:
        color_targets = color_targets * len(processed)

    _record_params(gen, req, mode, prepared, fill, soft, outpaint)
    denoise = float(req.denoising_strength)
    sigmas_all = img2img_sigmas(gen.sampler_info, gen.schedule, gen.model_schedule, req.steps, denoise,
                                bool(ctx.options["img2img_fix_steps"]))
    steps_run = len(sigmas_all) - 1 if denoise > 0 else 0
    ctx.control.begin(req.n_iter, steps_run * req.n_iter)

    init_latent = None
    try:
        with tiling(model, bool(req.tiling)) as gen.tiled:
            for n, idx in gen.batches():
                seeds, subseeds = gen.all_seeds[idx], gen.all_subseeds[idx]
                if denoise == 0:  # nothing to change: the (resized) input is the answer, as a user expects
                    results = [im if im.size == (req.width, req.height) else im.resize((req.width, req.height), Image.Resampling.LANCZOS)
                               for im in processed]
                    stop = None
                else:
                    if ctx.switch_model is not None:  # the previous batch may have ended on the refiner
                        ctx.switch_model(None, req)
                    if init_latent is None:
                        init_latent = _init_latents(ctx, processed, req, mode)
                    results, stop = _sample_batch(ctx, gen, req, processed, init_latent, prepared, fill, soft, seeds,
                                                  subseeds, sigmas_all.to(device), idx)
                if req.restore_faces:  # before the overlay, so that the pixels kept outside the mask stay as they were
                    results = restore_faces_for_job(ctx, results)
                for j, result in enumerate(results):
                    if j < len(color_targets):  # before the overlay: the kept pixels stay as they were
                        result = apply_color_correction(color_targets[j], result)
                    if prepared is not None:
                        result = image_ops.apply_overlay(result, prepared.paste_to, overlays[j])
                    gen.add_image(result, n * req.batch_size + j)
                if gen.end_batch(stop):
                    break
    except JobInterrupted:  # Interrupt while encoding the prompts: the images finished so far are the answer
        gen.interrupted = True

    return gen.finish({"denoising_strength": denoise, "resize_mode": mode,
                                    "is_using_inpainting_conditioning": bool(model.is_inpaint and prepared is not None)})


def _color_targets(ctx: JobContext, pictures: list[Image.Image]) -> list:
    """The colour-correction targets of a job's outputs, one per input picture; none when the setting is off."""
    if not ctx.options["img2img_color_correction"]:
        return []
    unique = {id(im): correction_target(im) for im in pictures}
    return [unique[id(im)] for im in pictures]


def save_init_images(gen: Generation, images: list[Image.Image]) -> str:
    """A1111's "Save init images": each input as received, named by the MD5 of its pixels; returns the first hash."""
    hashes = []
    for img in images:
        digest = hashlib.md5(img.tobytes()).hexdigest()
        folder = gen.outdir("outdir_init_images")
        if not (folder / f"{digest}.png").exists():
            save_image_or_warn(gen.ctx.warnings, "init image", img, folder, seed=None, infotext=None, forced_name=digest)
        hashes.append(digest)
    return hashes[0]


def _record_params(gen: Generation, req: Img2ImgRequest, mode: int, prepared, fill: int, soft: bool, outpaint) -> None:
    p = gen.params
    p["Denoising strength"] = format_number(req.denoising_strength)
    if mode:
        p["Resize mode"] = RESIZE_MODES[mode]
    multiplier = (req.initial_noise_multiplier if req.initial_noise_multiplier is not None
                  else gen.ctx.options["initial_noise_multiplier"])
    if multiplier not in (1, 1.0):
        p["Noise multiplier"] = format_number(multiplier)
    if prepared is not None:
        blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
        blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
        p["Mask blur"] = blur_x if blur_x == blur_y else None
        if blur_x != blur_y:
            p["Mask blur x"], p["Mask blur y"] = blur_x, blur_y
        p["Masked content"] = image_ops.MASKED_CONTENT[fill]
        if req.inpainting_mask_invert:
            p["Mask mode"] = image_ops.MASK_MODES[1]
        if prepared.region is not None:
            p["Inpaint area"] = image_ops.INPAINT_AREAS[1]
            p["Masked area padding"] = req.inpaint_full_res_padding
        if soft:
            p["Soft inpainting enabled"] = True
    if outpaint is not None:
        p["Outpainting"] = f"{outpaint[0]}px {'/'.join(outpaint[3])}"


def _init_latents(ctx: JobContext, processed: list[Image.Image], req: Img2ImgRequest, mode: int) -> torch.Tensor:
    unique = {id(im): im for im in processed}
    latents = {key: encode_images(ctx, [im], ctx.options["sd_vae_encode_method"]) for key, im in unique.items()}
    init = torch.cat([latents[id(im)] for im in processed])
    if mode == LATENT_RESIZE and init.shape[-2:] != (req.height // 8, req.width // 8):
        init = F.interpolate(init, size=(req.height // 8, req.width // 8), mode="bilinear", align_corners=False)
    return init


def _sample_batch(ctx: JobContext, gen: Generation, req: Img2ImgRequest, processed: list[Image.Image],
                  init_latent: torch.Tensor, prepared: PreparedMask | None, fill: int, soft: bool,
                  seeds: list[int], subseeds: list[int], sigmas: torch.Tensor, idx: slice):
    device = gen.device
    n = len(seeds)
    init = init_latent[:n].to(device)
    shape = tuple(init.shape[1:])
    rng = image_rng(ctx, shape, seeds, subseeds, req)
    noise = rng.first().to(device)

    latent_mask = None
    if prepared is not None:
        small = prepared.processing.resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
        change = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None, None].to(device)
        if not soft and req.mask_round:
            change = change.round()
        if fill == 2:  # latent noise
            init = init * (1 - change) + noise * change
        elif fill == 3:  # latent nothing
            init = init * (1 - change)
        latent_mask = mask_replacement(ctx).latent_mask(init, change) if soft else LatentMask(init, change)

    def make_denoiser(conditioner, model_schedule):
        # for the model the job samples with now: the job's own, or the refiner after the switch
        model = ctx.model
        conds = conditioner.schedules(gen.prompts[idx], req.steps, is_negative=False)  # the batch's prompts
        unconds = conditioner.schedules(gen.negatives[idx], req.steps, is_negative=True)
        image_cond = _image_conditioning(ctx, processed[:n], prepared) if model.is_inpaint else None
        hooks = ([latent_mask] if latent_mask is not None else []) + [
            h for h in ctx.sampling_hooks if not isinstance(h, InpaintMaskReplacement)]
        return CFGDenoiser(model, model_schedule, conds, unconds, req.cfg_scale, conditioner, device,
                           ctx.policy.dtype, req.width, req.height, image_cond, hooks=hooks,
                           skips=gen.uncond_skips, aesthetic_scores=aesthetic_scores(ctx.options),
                           **flow_guidance(req, ctx.options, model))

    denoiser = make_denoiser(gen.conditioner, gen.model_schedule)
    switch_at = refiner_switch_at(ctx, req, FIRST_PASS, False)
    if switch_at is not None:
        denoiser = RefinerDenoiser(ctx, denoiser, switch_at, req, lambda: make_denoiser(*gen.for_model()))
    multiplier = float(req.initial_noise_multiplier if req.initial_noise_multiplier is not None
                       else ctx.options["initial_noise_multiplier"])
    x = noised_latents(ctx.model, init, noise * multiplier, sigmas[0])
    top = img2img_sigma_max(gen.sampler_info, gen.schedule, gen.model_schedule, req.steps,
                            float(req.denoising_strength), bool(ctx.options["img2img_fix_steps"]))
    noise_sampler = sampler_noise(gen.sampler_info, rng, x, sigmas, seeds, top)
    latents, stop = run_sampler(ctx, gen.sampler_info, denoiser, x, sigmas, noise_sampler, gen.extra, gen.preview_every,
                                gen.token_merging)
    latents = denoiser.after_sampling(latents)
    return denoiser.after_decode(decode_latents(ctx, latents)), stop


def _image_conditioning(ctx: JobContext, processed: list[Image.Image], prepared: PreparedMask | None) -> torch.Tensor:
    """The 5 extra channels of an inpainting UNet: the mask and the latent of the image with the mask area blanked."""
    source = torch.cat([image_to_tensor(im) for im in processed])
    if prepared is None:
        mask = torch.ones(source.shape[0], 1, *source.shape[-2:])
    else:
        mask = torch.from_numpy(np.asarray(prepared.processing, dtype=np.float32) / 255.0).round()[None, None]
        mask = mask.repeat(source.shape[0], 1, 1, 1)
    blanked = encode_tensor(ctx, source * (1.0 - mask))
    latent_mask = F.interpolate(mask, size=blanked.shape[-2:]).to(blanked.device, blanked.dtype)
    return torch.cat([latent_mask, blanked], dim=1)


def run_batch(req: Img2ImgRequest, ctx: JobContext, input_dir: Path, output_dir: Path | None,
              mask_dir: Path | None, before_each=None) -> GenerationResult:
    """img2img over every image of a folder (with same-named masks), saving into the output folder.

    A file that is not a readable image is skipped with a warning; the rest still run. `before_each(image, mask)`
    runs before each file's generation (the worker prepares the job's always-on scripts from them).
    """
    if not any(p.is_file() for p in input_dir.iterdir()):
        raise UserError(f"The input folder {input_dir} has no files.")
    warnings: list[str] = []
    files = folder_images(input_dir, warnings)  # only files that are images by name and by content reach a decoder
    for warning in warnings:
        log.warning("img2img batch: %s", warning)
    masks = {}
    if mask_dir is not None:
        masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    all_images, infotexts = [], []
    interrupted = False
    last: GenerationResult | None = None
    for path in files:
        if ctx.control.interrupted():
            interrupted = True
            break
        try:
            image = open_folder_image(path)
            mask = open_folder_image(masks[path.stem]) if path.stem in masks else None
            job_req = req.model_copy(update={"do_not_save_grid": True})
            if before_each is not None:
                before_each(image, mask)
            last = run(job_req, ctx, [image], mask, samples_dir=output_dir)
        except JobInterrupted:  # while preparing this file's always-on scripts
            interrupted = True
            break
        except (UserError, OSError) as exc:
            message = exc.message if isinstance(exc, UserError) else str(exc)
            log.error("img2img batch: skipped %s: %s", path.name, message)
            warnings.append(f"Skipped {path.name}: {message}")
            continue
        all_images.extend(last.images)
        infotexts.extend(last.info.get("infotexts", []))
        if last.interrupted:
            interrupted = True
            break
    if last is None:
        if interrupted:
            return GenerationResult(images=[], info={"infotexts": [], "batch_files": len(files)},
                                    warnings=warnings + list(ctx.warnings), interrupted=True)
        raise UserError("No image in the batch could be processed: " + " ".join(warnings))
    info = dict(last.info)
    info["infotexts"] = infotexts
    info["batch_files"] = len(files)
    return GenerationResult(images=all_images, info=info, warnings=warnings + list(ctx.warnings), interrupted=interrupted)
