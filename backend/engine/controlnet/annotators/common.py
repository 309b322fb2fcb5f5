"""What every annotator module shares: where weight files come from and how they load, and small tensor helpers.

- `WeightFile`: a public weight file (its name, sd-webui-controlnet's `downloads/<subfolder>/`, its URL);
- `AnnotatorEnv`: the annotator folder and device of one backend; finds a weight file (also in its
  sub-folder), downloads it when missing (or says where to put it, offline), loads it into a network
  with `weights_only`, and keeps one network in memory at a time;
- `env_from(kwargs)`: the `AnnotatorEnv` a preprocessor call was given;
- `resize_maps`: bicubic resizing of (N, C, H, W) maps, as the OpenPose and anime lineart models use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backend.core.errors import UserError

log = logging.getLogger("easel.annotators")

ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    """A public annotator weight file: its name, its sub-folder, where to download it."""

    filename: str
    subfolder: str  # sd-webui-controlnet's downloads/<subfolder>/
    url: str


@dataclass
class AnnotatorEnv:
    """Where annotator weights live and run: the folder, the device, whether downloads are allowed."""

    folder: Path
    device: str = "cpu"
    allow_download: bool = True
    progress: Callable[[int, int], None] | None = None
    models: dict = field(default_factory=dict)

    def find(self, weights: WeightFile) -> Path | None:
        for candidate in (self.folder / weights.filename, self.folder / weights.subfolder / weights.filename):
            if candidate.is_file():
                return candidate
        return None

    def weights_path(self, weights: WeightFile, what: str) -> Path:
        found = self.find(weights)
        if found is not None:
            return found
        target = self.folder / weights.filename
        hint = (f"The {what} preprocessor needs {weights.filename}, which is not in {self.folder}. "
                f"Download it from {weights.url} and put it at {target}")
        from backend.downloads import download_file, network_available
        if not self.allow_download:
            raise UserError(hint + ".", status=424)
        if not network_available(weights.url):
            raise UserError(hint + " (no internet connection was found to download it now).", status=424)
        log.info("downloading %s for the %s preprocessor", weights.filename, what)
        try:
            return download_file(weights.url, target, self.progress)
        except UserError as exc:
            raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=424) from exc

    def load(self, key: str, weights: WeightFile, what: str, build: Callable, remap: Callable | None = None,
             sized: bool = False, unwrap: str | None = None):
        """The network `build()` (`build(sd)` when `sized`: shaped from the file) with the weights of `weights`
        loaded, cached per env; `remap(net, sd)` renames keys."""
        if key not in self.models:
            self.models.clear()  # one annotator network in memory at a time (some are 1 GB and more)
            import torch

            from backend.engine.state_dict_io import read_state_dict
            path = self.weights_path(weights, what)
            sd = _read_nested(path, unwrap) if unwrap else read_state_dict(path)
            try:
                net = build(sd) if sized else build()
            except (KeyError, ValueError, IndexError) as exc:
                raise UserError(f"{path.name} does not fit the {what} network ({type(exc).__name__}: {exc}). "
                                f"The file may be damaged; delete it and try again.") from exc
            if remap is not None:
                sd = remap(net, sd)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise UserError(f"{path.name} does not fit the {what} network (missing {len(missing)}, unexpected "
                                f"{len(unexpected)} tensors, e.g. {', '.join(list(missing)[:2] + list(unexpected)[:2])}). "
                                f"The file may be damaged; delete it and try again.")
            net.eval().requires_grad_(False).to(self.device, torch.float32)
            self.models[key] = net
        return self.models[key]


def _read_nested(path: Path, key: str) -> dict:
    """The tensors under `key` of a checkpoint dict (e.g. {"model": state_dict, ...}), loaded with weights_only."""
    import torch

    from backend.engine.state_dict_io import read_state_dict, safe_unpickle_globals
    if path.suffix.lower() == ".safetensors":
        return read_state_dict(path)
    try:
        with torch.serialization.safe_globals(safe_unpickle_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  damaged file or pickled code: refused either way
        raise UserError(f"Could not read {path.name} safely ({type(exc).__name__}: {str(exc)[:200]}). Delete it and "
                        f"download it again.") from exc
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def env_from(kwargs) -> AnnotatorEnv:
    """The `AnnotatorEnv` a preprocessor was called with (`env=`); only the backend has one."""
    env = kwargs.get("env")
    if env is None:
        raise UserError("Model-based preprocessors run in the backend (no annotator folder was given).")
    return env


def resize_maps(x, height: int, width: int):
    """(N, C, H, W) maps resized bicubically to `height` x `width`."""
    import torch.nn.functional as F
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
