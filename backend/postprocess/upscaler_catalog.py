"""The upscalers on offer: None, Lanczos, Nearest and every model file found, and the size limit of their output.

Torch-free: the app lists them (UI, `/sdapi/v1/upscalers`, `/sdapi/v1/realesrgan-models`) and checks the
names and sizes of requests before they are queued; the backend finds the upscaler a job names here and
runs it (`backend.engine.postprocess.upscalers`).

Model upscalers are the files in `models/ESRGAN`, `models/RealESRGAN` (plus `--esrgan-models-path`,
`--realesrgan-models-path`), `models/SwinIR` and `models/DAT`. They are named after their file as in A1111
(`4x-UltraSharp`), the known Real-ESRGAN files by A1111's names (`R-ESRGAN 4x+`); the two Real-ESRGAN models
A1111 offers by default are listed even before they are downloaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import UserError
from backend.core.paths import list_files
from backend.postprocess.model_files import MODEL_EXTENSIONS, is_helper_file

MAX_OUTPUT_SIDE = 16384
MAX_OUTPUT_PIXELS = 16384 * 8192

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



def check_output_size(width: int, height: int, what: str = "The upscaled image") -> None:
    if width > MAX_OUTPUT_SIDE or height > MAX_OUTPUT_SIDE or width * height > MAX_OUTPUT_PIXELS:
        raise UserError(f"{what} would be {width}x{height}, over Easel's limit of {MAX_OUTPUT_SIDE} pixels a side and "
                        f"{MAX_OUTPUT_PIXELS // 1_000_000} megapixels. Choose a smaller scale or size.", status=413)


def check_extras_size(req) -> None:
    """Refuse an Extras request whose "scale to" size is over the limit (`req`: an ExtrasRequest)."""
    if req.resize_mode == 1:
        check_output_size(req.upscaling_resize_w, req.upscaling_resize_h, "The requested size")
