"""The checks of generation requests that need no model: run once by the app at the edge, before a job is queued.

Torch-free (the app process imports it): sizes, steps, seeds, hires. fix (its target
size and the latent upscale modes), img2img's resize modes, outpainting and "SD upscale" script arguments, and
img2img's inputs. Names of upscaler models are checked by `backend.postprocess.service`, where the model folders
are known. The pipelines (engine) trust what passed here and do not check it again; they read the same helpers
to parse the request (`hires_size`, `outpainting_args`, `sd_upscale_args`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

from backend.core.errors import UserError
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest

RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]
LATENT_RESIZE = 3


def resize_mode_index(value) -> int:
    """0-3 from an int or one of A1111's labels."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        for i, label in enumerate(RESIZE_MODES):
            if value.strip().lower() == label.lower():
                return i
        raise UserError(f"Unknown resize mode {value!r}. Valid: {', '.join(RESIZE_MODES)} (or 0-3).")
    index = int(value)
    if not 0 <= index < len(RESIZE_MODES):
        raise UserError(f"resize_mode must be 0-3 ({', '.join(RESIZE_MODES)}), got {index}.")
    return index


def validate_size(width: int, height: int, what: str = "") -> None:
    """64-4096 pixels a side (a safety limit: the latent and the VAE's memory grow with the area). Any size in
    between is accepted, as A1111 accepts it; the picture is the latent's size (`latent_size`)."""
    for name, v in (("width", width), ("height", height)):
        if not 64 <= v <= 4096:
            raise UserError(f"{what}{name} must be between 64 and 4096, got {v}.")


def latent_size(width: int, height: int) -> tuple[int, int]:
    """The size a generation makes: A1111's latent is width // 8 x height // 8, so a side that is not a multiple
    of 8 is floored to one (513 x 700 -> 512 x 696)."""
    return width // 8 * 8, height // 8 * 8


def with_latent_size(req):
    """`req` with its width and height floored to the size the generation makes (`latent_size`); the same object
    when they are multiples of 8 already. The app sends the job this way (the always-on scripts size their
    inputs from it); the pipelines apply it again to the requests scripts derive (X/Y/Z sizes, prompt lines)."""
    w, h = latent_size(req.width, req.height)
    return req if (w, h) == (req.width, req.height) else req.model_copy(update={"width": w, "height": h})


# A safety cap, not A1111's (it has none): far above any useful count, it keeps one request from holding the
# backend for hours. The UI's slider stops at 150, as A1111's.
MAX_STEPS = 1000


def validate_generation(req) -> None:
    """The checks every generation request shares (size, steps, batch, CFG, variation strength)."""
    validate_size(req.width, req.height)
    if not 1 <= req.steps <= MAX_STEPS:
        raise UserError(f"steps must be between 1 and {MAX_STEPS} (a safety limit), got {req.steps}.")
    if not 1 <= req.batch_size <= 64:
        raise UserError(f"batch_size must be between 1 and 64, got {req.batch_size}.")
    if not 1 <= req.n_iter <= 1000:
        raise UserError(f"n_iter (batch count) must be between 1 and 1000, got {req.n_iter}.")
    if not 0 <= req.cfg_scale <= 100:
        raise UserError(f"cfg_scale must be between 0 and 100, got {req.cfg_scale}.")
    distilled = getattr(req, "distilled_cfg_scale", None)
    if distilled is not None and not 0 <= distilled <= 100:
        raise UserError(f"distilled_cfg_scale must be between 0 and 100, got {distilled}.")
    if not 0 <= req.subseed_strength <= 1:
        raise UserError(f"subseed_strength must be between 0 and 1, got {req.subseed_strength}.")
    validate_seeds(req)


# The noise generators take 64-bit seeds; Easel keeps every seed of a job (seed + image index) a signed 64-bit
# number, so that it reads back from the infotext and from `info` in any client. A1111 draws random seeds below 2^32.
MAX_SEED_VALUE = 2**63 - 1


def validate_seeds(req) -> None:
    """seed and subseed: -1 (or any negative) for random, else a number the job's seeds stay within 64 bits from."""
    images = max(1, int(req.batch_size) * int(req.n_iter))
    for name in ("seed", "subseed"):
        value = int(getattr(req, name))
        if value + images - 1 > MAX_SEED_VALUE:
            raise UserError(f"{name} must be at most {MAX_SEED_VALUE - images + 1} (2^63 - 1 less the job's "
                            f"{images - 1} further images), got {value}; use -1 for a random seed.")
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = int(getattr(req, name))
        if value > 4096:
            raise UserError(f"{name} must be at most 4096 (or 0 / -1 for off), got {value}.")


LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def check_txt2img(req: Txt2ImgRequest) -> None:
    validate_generation(req)
    if req.enable_hr:
        # hr_upscaler: latent modes, None/Lanczos/Nearest or a model upscaler; names are checked by the service
        # (where the model folders are known) and resolved when the pass runs (backend.engine.postprocess.upscalers).
        if not 0 <= req.hr_second_pass_steps <= MAX_STEPS:
            raise UserError(f"hr_second_pass_steps must be between 0 and {MAX_STEPS} (a safety limit; 0: the "
                            f"first pass's steps), got {req.hr_second_pass_steps}.")
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


OUTPAINT_SCRIPTS = ("poor man's outpainting", "outpainting mk2", "outpainting")


def check_img2img(req: Img2ImgRequest) -> None:
    validate_generation(req)
    if not 0 <= req.denoising_strength <= 1:
        raise UserError(f"denoising_strength must be between 0 and 1, got {req.denoising_strength}.")
    if req.inpainting_fill not in (0, 1, 2, 3):
        raise UserError("inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing).")
    for name in ("mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
        if not 0 <= getattr(req, name) <= 256:
            raise UserError(f"{name} must be between 0 and 256, got {getattr(req, name)}.")
    if req.mask_blur is not None and not 0 <= req.mask_blur <= 256:
        raise UserError(f"mask_blur must be between 0 and 256, got {req.mask_blur}.")
    resize_mode_index(req.resize_mode)
    outpainting_args(req)
    sd_upscale_args(req)


def check_img2img_inputs(req: Img2ImgRequest, images: int | None, has_mask: bool) -> None:
    """What an img2img job gets besides its request: at least one init image (`images`: how many; None: a folder
    batch's files, counted by the job), and no mask with SD upscale (a mask, or a batch's mask folder)."""
    if images is not None and images < 1:
        raise UserError("img2img needs an init image.")
    if has_mask and is_sd_upscale(req):
        raise UserError("SD upscale redraws the whole picture; it does not take a mask. Use it from the img2img tab.")


def outpainting_args(req: Img2ImgRequest) -> tuple[int, int, int, list[str]] | None:
    """(pixels, mask blur, masked content, directions) from A1111's outpainting scripts' args, or None."""
    name = (req.script_name or "").strip().lower()
    if name not in OUTPAINT_SCRIPTS:  # another script (names are checked by backend.core.scripts_catalog)
        return None
    args = list(req.script_args or [])
    try:
        if name == "outpainting mk2":  # (info, pixels, mask_blur, direction, noise_q, color_variation)
            pixels, blur, directions, fill = int(args[1]), int(args[2]), args[3], 1
        else:  # poor man's: (pixels, mask_blur, inpainting_fill, direction)
            pixels, blur, fill, directions = int(args[0]), int(args[1]), int(args[2]), args[3]
    except (IndexError, TypeError, ValueError) as exc:
        raise UserError(f"script_args for {req.script_name!r} must be [pixels, mask_blur, masked_content, directions] "
                        f"(Poor man's outpainting) or [info, pixels, mask_blur, directions, ...] (Outpainting mk2).") from exc
    if isinstance(directions, str):
        directions = [directions]
    if fill not in (0, 1, 2, 3):
        raise UserError("Outpainting masked content must be 0-3 (fill, original, latent noise, latent nothing).")
    return pixels, blur, fill, [str(d).lower() for d in directions]


SD_UPSCALE_SCRIPT = "SD upscale"
SD_UPSCALE_MAX_OVERLAP = 256  # A1111's slider
SD_UPSCALE_MIN_SCALE, SD_UPSCALE_MAX_SCALE = 1.0, 4.0  # A1111's slider


@dataclass(frozen=True)
class SDUpscaleArgs:
    overlap: int
    upscaler: int | str  # index into the upscaler list, or a name
    scale: float


def is_sd_upscale(req: Img2ImgRequest) -> bool:
    return (req.script_name or "").strip().lower() == SD_UPSCALE_SCRIPT.lower()


def sd_upscale_args(req: Img2ImgRequest) -> SDUpscaleArgs | None:
    """The checked [_unused, overlap, upscaler, scale_factor] of an SD upscale request, or None for another script."""
    if not is_sd_upscale(req):
        return None
    args = list(req.script_args or [])
    usage = "script_args for 'SD upscale' must be [_unused, overlap, upscaler index or name, scale factor]"
    if len(args) < 4:
        raise UserError(f"{usage}; got {len(args)} values.")
    try:
        overlap, scale = int(args[1]), float(args[3])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{usage}: overlap must be a whole number and scale factor a number.") from exc
    upscaler = args[2]
    if isinstance(upscaler, float) and upscaler.is_integer():
        upscaler = int(upscaler)
    if isinstance(upscaler, bool) or not isinstance(upscaler, (int, str)):
        raise UserError(f"{usage}: the upscaler must be an index into /sdapi/v1/upscalers or a name, got {upscaler!r}.")
    if not 0 <= overlap <= SD_UPSCALE_MAX_OVERLAP:
        raise UserError(f"SD upscale: overlap must be between 0 and {SD_UPSCALE_MAX_OVERLAP} pixels, got {overlap}.")
    if overlap >= min(req.width, req.height):
        raise UserError(f"SD upscale: overlap ({overlap}) must be smaller than the tile size {req.width}x{req.height}.")
    if not SD_UPSCALE_MIN_SCALE <= scale <= SD_UPSCALE_MAX_SCALE:
        raise UserError(f"SD upscale: scale factor must be between {SD_UPSCALE_MIN_SCALE:g} and {SD_UPSCALE_MAX_SCALE:g}, got {scale:g}.")
    return SDUpscaleArgs(overlap, upscaler, scale)
