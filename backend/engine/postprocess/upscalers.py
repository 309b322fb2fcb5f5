"""The upscalers: a registry (None, Lanczos, Nearest and every model file found) and tiled model inference.

Model upscalers are the files in `models/ESRGAN`, `models/RealESRGAN` (plus `--esrgan-models-path`,
`--realesrgan-models-path`), `models/SwinIR` and `models/DAT`: any architecture spandrel loads. They are
named after their file as in A1111 (`4x-UltraSharp`), the known Real-ESRGAN files by A1111's names
(`R-ESRGAN 4x+`); the two Real-ESRGAN models A1111 offers by default are listed even before they are
downloaded, and are downloaded into `models/RealESRGAN` on first use (offline: a clear error).

Models run in tiles (settings `ESRGAN_tile`, `ESRGAN_tile_overlap`; 0 turns tiling off): each tile is
run with `overlap` pixels of context on every side and only its centre is kept, so the result is written
straight into an 8-bit output and memory stays bounded by the tile size, whatever the image size.
Scales above the model's run it again (A1111: up to 3 passes); the last step resizes to the exact size
with Lanczos.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from backend.core.errors import JobInterrupted, UserError
from backend.core.job_options import JobOptions
from backend.core.paths import list_files
from backend.postprocess.model_files import MODEL_EXTENSIONS, is_helper_file

log = logging.getLogger("easel.postprocess")

DEFAULT_TILE = 192
DEFAULT_TILE_OVERLAP = 8
MAX_MODEL_PASSES = 3
MAX_OUTPUT_SIDE = 16384
MAX_OUTPUT_PIXELS = 16384 * 8192

RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}

_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
# file name -> (A1111's name, download URL, scale)
REALESRGAN_MODELS = {
    "realesrgan_x4plus.pth": ("R-ESRGAN 4x+", f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth", 4),
    "realesrgan_x4plus_anime_6b.pth": ("R-ESRGAN 4x+ Anime6B", f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth", 4),
    "realesr-general-x4v3.pth": ("R-ESRGAN General 4xV3", f"{_RELEASES}/v0.2.5.0/realesr-general-x4v3.pth", 4),
    "realesr-general-wdn-x4v3.pth": ("R-ESRGAN General WDN 4xV3", f"{_RELEASES}/v0.2.5.0/realesr-general-wdn-x4v3.pth", 4),
    "realesr-animevideov3.pth": ("R-ESRGAN AnimeVideo", f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth", 4),
    "realesrgan_x2plus.pth": ("R-ESRGAN 2x+", f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth", 2),
}
# Listed (and downloaded on first use) even when absent, as A1111's default `realesrgan_enabled_models`.
REALESRGAN_DEFAULTS = ("realesrgan_x4plus.pth", "realesrgan_x4plus_anime_6b.pth")
_DOWNLOAD_NAMES = {"realesrgan_x4plus.pth": "RealESRGAN_x4plus.pth",
                   "realesrgan_x4plus_anime_6b.pth": "RealESRGAN_x4plus_anime_6B.pth"}


@dataclass(frozen=True)
class Upscaler:
    name: str
    kind: str  # "none" | "resample" | "model"
    family: str | None = None  # A1111's model_name: ESRGAN, RealESRGAN, SwinIR, DAT
    path: Path | None = None  # the model file (for a downloadable model: where it will be saved)
    url: str | None = None  # where a known model is downloaded from when the file is absent
    scale: int = 4

    def as_api(self) -> dict:
        """A1111's /sdapi/v1/upscalers item."""
        return {"name": self.name, "model_name": self.family, "model_path": str(self.path) if self.path else self.url,
                "model_url": None, "scale": self.scale}


BUILTIN = [Upscaler("None", "none"), Upscaler("Lanczos", "resample"), Upscaler("Nearest", "resample")]


def upscaler_name(choice: int | str, registry) -> str:
    """The upscaler an index (GET /sdapi/v1/upscalers order) or a name stands for; `registry`: an UpscalerRegistry,
    or None for the built-in resizers only."""
    ups = registry.all() if registry is not None else list(BUILTIN)
    if isinstance(choice, int):
        if not 0 <= choice < len(ups):
            raise UserError(f"SD upscale: upscaler index {choice} is out of range; there are {len(ups)} upscalers "
                            f"(0-{len(ups) - 1}: {', '.join(u.name for u in ups)}).")
        return ups[choice].name
    if registry is not None:
        return registry.find(choice).name
    for up in ups:
        if up.name.lower() == choice.strip().lower():
            return up.name
    raise UserError(f"Unknown upscaler {choice!r}. Available: {', '.join(u.name for u in ups)}.")


def scale_from_name(name: str, default: int = 4) -> int:
    """The scale a model file's name states ('4x-UltraSharp', 'RealESRGAN_x2plus', 'DAT_x3'), else `default`."""
    m = re.search(r"(?:^|[^a-z0-9])([1-8])x(?:[^a-z]|$)|(?:^|[^a-z0-9])x([1-8])(?:[^0-9]|$)", name.lower())
    if not m:
        m = re.search(r"([1-8])x|x([1-8])", name.lower())
    return int(m.group(1) or m.group(2)) if m else default


class UpscalerRegistry:
    """Every upscaler the model folders offer, read from disk on each call (cheap; new files show up at once)."""

    def __init__(self, folders: dict[str, list[Path]], realesrgan_dir: Path):
        self.folders = folders  # family -> folders
        self.realesrgan_dir = realesrgan_dir

    @classmethod
    def from_paths(cls, paths) -> "UpscalerRegistry":
        return cls({"ESRGAN": paths.esrgan_dirs, "RealESRGAN": paths.realesrgan_dirs,
                    "SwinIR": [paths.models_dir / "SwinIR"], "DAT": [paths.models_dir / "DAT"]},
                   paths.realesrgan_dirs[0])

    def model_upscalers(self) -> list[Upscaler]:
        found: list[Upscaler] = []
        seen_files: set[Path] = set()
        known_present: set[str] = set()
        for family, folders in self.folders.items():
            for path in list_files(folders, MODEL_EXTENSIONS):
                if path in seen_files or is_helper_file(path):
                    continue
                seen_files.add(path)
                known = REALESRGAN_MODELS.get(path.name.lower())
                if known is not None:
                    known_present.add(path.name.lower())
                    found.append(Upscaler(known[0], "model", "RealESRGAN", path, known[1], known[2]))
                else:
                    found.append(Upscaler(path.stem, "model", family, path, None, scale_from_name(path.stem)))
        for key in REALESRGAN_DEFAULTS:
            if key not in known_present:
                name, url, scale = REALESRGAN_MODELS[key]
                found.append(Upscaler(name, "model", "RealESRGAN", self.realesrgan_dir / _DOWNLOAD_NAMES[key], url, scale))
        # the same name from two folders: tell them apart by family
        counts: dict[str, int] = {}
        for up in found:
            counts[up.name] = counts.get(up.name, 0) + 1
        named = [up if counts[up.name] == 1 else Upscaler(f"{up.name} ({up.family})", up.kind, up.family, up.path, up.url,
                                                          up.scale) for up in found]
        return sorted(named, key=lambda u: u.name.lower())

    def all(self) -> list[Upscaler]:
        return BUILTIN + self.model_upscalers()

    def names(self) -> list[str]:
        return [u.name for u in self.all()]

    def find(self, name: str | None) -> Upscaler:
        """By name (case-insensitive), or by the model's file name / stem, as API clients sometimes send."""
        wanted = (name or "None").strip()
        ups = self.all()
        for up in ups:
            if up.name == wanted:
                return up
        low = wanted.lower()
        for up in ups:
            if up.name.lower() == low or (up.path is not None and low in (up.path.name.lower(), up.path.stem.lower())):
                return up
        raise UserError(f"Unknown upscaler {wanted!r}. Available: {', '.join(u.name for u in ups)}.")


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


def check_output_size(width: int, height: int, what: str = "The upscaled image") -> None:
    if width > MAX_OUTPUT_SIDE or height > MAX_OUTPUT_SIDE or width * height > MAX_OUTPUT_PIXELS:
        raise UserError(f"{what} would be {width}x{height}, over Easel's limit of {MAX_OUTPUT_SIDE} pixels a side and "
                        f"{MAX_OUTPUT_PIXELS // 1_000_000} megapixels. Choose a smaller scale or size.", status=413)


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
    from backend.image_ops import flatten

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
