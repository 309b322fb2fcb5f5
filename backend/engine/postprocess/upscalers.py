"""Running the upscalers: tiled model inference, resizing, and the upscale steps of jobs.

The upscalers on offer (None, Lanczos, Nearest and every model file found) are listed by
`backend.postprocess.upscaler_catalog`; a model upscaler is any architecture spandrel loads. The
Real-ESRGAN models A1111 offers by default are downloaded into `models/RealESRGAN` on first use
(offline: a clear error).

Models run in tiles (settings `ESRGAN_tile`, `ESRGAN_tile_overlap`; 0 turns tiling off): each tile is
run with `overlap` pixels of context on every side and only its centre is kept, so the result is written
straight into an 8-bit output and memory stays bounded by the tile size, whatever the image size.
Scales above the model's run it again (A1111: up to 3 passes); the last step resizes to the exact size
with Lanczos.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from backend.core.errors import JobInterrupted, UserError
from backend.core.job_options import JobOptions
from backend.postprocess.upscaler_catalog import BUILTIN, Upscaler, check_output_size

log = logging.getLogger("easel.postprocess")

DEFAULT_TILE = 192
DEFAULT_TILE_OVERLAP = 8
MAX_MODEL_PASSES = 3
RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}

def model_file(up: Upscaler) -> Path:
    """The upscaler's model file, downloaded first when it is a known model not yet on disk."""
    from backend.downloads import download_file, network_available

    if up.path is not None and up.path.is_file():
        return up.path
    if up.url is None or up.path is None:
        raise UserError(f"The model file of upscaler {up.name!r} is missing ({up.path}).", status=404)
    if not network_available(up.url):
        raise UserError(f"Upscaler {up.name!r} is not downloaded yet and there is no internet connection. Download "
                        f"{up.url} and put it in {up.path.parent}.", status=404)
    log.info("downloading %s for upscaler %s into %s", up.url, up.name, up.path.parent)
    return download_file(up.url, up.path)


# -- sizes ----------------------------------------------------------------------------------------------
def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def tile_spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Split 0..length into near-equal spans of at most `tile` (one span when tiling is off or not needed)."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    count = math.ceil(length / tile)
    step = math.ceil(length / count)
    return [(i * step, min(length, (i + 1) * step)) for i in range(count) if i * step < length]


def tile_count(width: int, height: int, tile: int) -> int:
    return len(tile_spans(width, tile)) * len(tile_spans(height, tile))


# -- inference ------------------------------------------------------------------------------------------
def run_model(loaded, rgb: np.ndarray, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_TILE_OVERLAP,
              on_tile: Callable[[], None] | None = None, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """One pass of an image model over an HxWx3 uint8 array, in tiles -> (H*scale)x(W*scale)x3 uint8."""
    import torch
    from spandrel import ModelTiling

    model, scale = loaded.model, loaded.scale
    h, w = rgb.shape[:2]
    check_output_size(w * scale, h * scale, "The model's output")
    if model.tiling == ModelTiling.INTERNAL:
        tile = 0
    overlap = max(0, int(overlap))
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    for y0, y1 in tile_spans(h, tile):
        for x0, x1 in tile_spans(w, tile):
            if should_stop is not None and should_stop():
                raise JobInterrupted()
            cy0, cy1, cx0, cx1 = max(0, y0 - overlap), min(h, y1 + overlap), max(0, x0 - overlap), min(w, x1 + overlap)
            patch = torch.from_numpy(np.array(rgb[cy0:cy1, cx0:cx1], copy=True)).permute(2, 0, 1)[None]
            patch = patch.to(loaded.device, torch.float32).div_(255.0)
            if model.input_channels == 1:
                patch = (patch * torch.tensor([0.299, 0.587, 0.114], device=patch.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            patch = patch.to(loaded.dtype)
            if loaded.channels_last:
                patch = patch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                result = model(patch)
                if result.shape[1] == 1:
                    result = result.expand(-1, 3, -1, -1)
                core = result[0, :, (y0 - cy0) * scale:(y1 - cy0) * scale, (x0 - cx0) * scale:(x1 - cx0) * scale]
                out[y0 * scale:y1 * scale, x0 * scale:x1 * scale] = (
                    core.float().clamp(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
            del patch, result, core
            if on_tile is not None:
                on_tile()
    return out


def model_passes(width: int, height: int, scale: float, model_scale: int) -> int:
    """How many times A1111 runs a model for `scale`: until the target is reached (at most 3), once for scale 1."""
    dest_w, dest_h = target_size(width, height, scale)
    passes, w, h = 0, width, height
    for i in range(MAX_MODEL_PASSES):
        if w >= dest_w and h >= dest_h and (i > 0 or scale != 1):
            break
        w, h = w * model_scale, h * model_scale
        passes += 1
        if model_scale == 1:
            break
    return passes


def planned_tiles(width: int, height: int, scale: float, model_scale: int, tile: int) -> int:
    total, w, h = 0, width, height
    for _ in range(model_passes(width, height, scale, model_scale)):
        total += tile_count(w, h, tile)
        w, h = w * model_scale, h * model_scale
    return total


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """-> (RGB image, alpha channel or None). 16-bit and palette images become 8-bit RGB."""
    from backend.core.image_prep import flatten

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return flatten(image if image.mode != "F" else image.convert("I")), None
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return image.convert("RGB"), None


def join_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.Resampling.LANCZOS)
    out = rgb.copy()
    out.putalpha(alpha)
    return out


def upscale(image: Image.Image, up: Upscaler, scale: float, *, load: Callable[[Upscaler], object] | None = None,
            tile: int = DEFAULT_TILE, overlap: int = DEFAULT_TILE_OVERLAP, on_tile: Callable[[], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """Scale `image` by `scale` with upscaler `up` to exactly round(size * scale).

    `load(up)` gives the `LoadedModel` of a model upscaler (the cache in the backend process). An alpha
    channel is resized with Lanczos beside the model's RGB; grayscale stays grayscale.
    """
    if scale <= 0:
        raise UserError(f"The upscale factor must be positive, got {scale}.")
    dest = target_size(image.width, image.height, scale)
    check_output_size(*dest)
    gray = image.mode in ("L", "LA", "1") or image.mode.startswith("I")
    rgb, alpha = split_alpha(image)
    if up.kind == "none":
        result = rgb if rgb.size == dest else rgb.resize(dest, Image.Resampling.LANCZOS)
    elif up.kind == "resample":
        result = rgb.resize(dest, RESAMPLERS[up.name])
    else:
        if load is None:
            raise ValueError("a model upscaler needs a loader")
        loaded = load(up)
        result = rgb
        for _ in range(model_passes(rgb.width, rgb.height, scale, loaded.scale)):
            arr = np.asarray(result)
            while True:
                try:
                    out = run_model(loaded, arr, tile=tile, overlap=overlap, on_tile=on_tile, should_stop=should_stop)
                    break
                except MemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001  CUDA out of memory: smaller tiles, as many times as useful
                    if type(exc).__name__ != "OutOfMemoryError" or (tile and tile <= 32):
                        raise
                    tile = max(32, (tile or max(arr.shape[:2])) // 2)
                    _empty_device_cache()
                    log.warning("out of device memory while upscaling with %s: retrying with %d px tiles", up.name, tile)
            result = Image.fromarray(out)
        if result.size != dest:
            result = result.resize(dest, Image.Resampling.LANCZOS)
    if gray:
        result = result.convert("L")
    return join_alpha(result, alpha)


def _empty_device_cache() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resize_cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height keeping the aspect ratio, then crop the middle."""
    ratio = max(width / img.width, height / img.height)
    sw, sh = max(width, round(img.width * ratio)), max(height, round(img.height * ratio))
    if (sw, sh) != img.size:
        img = img.resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - width) // 2, (sh - height) // 2
    return img.crop((left, top, left + width, top + height))


def upscale_for_job(ctx, image: Image.Image, name: str, width: int, height: int) -> Image.Image:
    """Upscale a generated image to width x height with a named upscaler (txt2img hires. fix, img2img SD upscale).

    None/Lanczos/Nearest resize directly; a model upscaler runs (tiled, on the device its policy gives, with the
    job's tile settings) to cover the size. Either way the result covers width x height and its middle is kept.
    """
    builtin = {u.name.lower(): u for u in BUILTIN}.get((name or "None").strip().lower())
    if builtin is not None:
        resample = RESAMPLERS.get(builtin.name, Image.Resampling.LANCZOS)
        ratio = max(width / image.width, height / image.height)
        sw, sh = max(width, round(image.width * ratio)), max(height, round(image.height * ratio))
        img = image.resize((sw, sh), resample)
        left, top = (sw - width) // 2, (sh - height) // 2
        return img.crop((left, top, left + width, top + height))
    runtime = ctx.postprocess
    if runtime is None:
        raise UserError(f"Upscaler {name!r} needs the backend's post-processing models, which this job does not have.")
    runtime.apply_options(ctx.options)
    up = runtime.upscalers().find(name)
    scale = max(width / image.width, height / image.height)
    tile, overlap = tile_settings(ctx.options)
    try:  # Interrupt stops it between tiles (JobInterrupted)
        big = upscale(image, up, scale, load=runtime.load_upscaler, tile=tile, overlap=overlap,
                      should_stop=getattr(getattr(ctx, "control", None), "interrupted", None))
    finally:
        runtime.release()
    return resize_cover(big, width, height)


def tile_settings(options: Mapping[str, Any]) -> tuple[int, int]:
    options = JobOptions.of(options)
    return int(options["ESRGAN_tile"]), int(options["ESRGAN_tile_overlap"])
