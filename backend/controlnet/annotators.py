"""Model-based ControlNet preprocessors ("annotators"): their networks, weights and post-processing.

Implemented (network definitions written here, loading the public weight files that
sd-webui-controlnet uses, from lllyasviel/Annotators):
- `softedge_hed` (alias `hed`), `softedge_hedsafe` (`hed_safe`), `scribble_hed`: HED soft edges,
  `ControlNetHED.pth` (the Apache-2.0 HED re-implementation of ControlNet 1.1);
- `lineart_realistic` (internal name `lineart`) and `lineart_coarse`: the "informative drawings"
  line generator, `sk_model.pth` / `sk_model2.pth`.

Weights are looked for in `models/ControlNet-annotators/` (also in a sub-folder named after the
annotator, as sd-webui-controlnet's `annotator/downloads/<name>/` lays them out). When missing,
they are downloaded on first use with a progress bar; offline, a `UserError` names the missing
file, where it comes from, and where to put it. Files load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .preprocessors import RES, Preprocessor, hwc3, resize_with_pad

log = logging.getLogger("easel.annotators")

ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    subfolder: str  # sd-webui-controlnet's downloads/<subfolder>/
    url: str


HED_WEIGHTS = WeightFile("ControlNetHED.pth", "hed", ANNOTATORS_URL + "ControlNetHED.pth")
LINEART_WEIGHTS = WeightFile("sk_model.pth", "lineart", ANNOTATORS_URL + "sk_model.pth")
LINEART_COARSE_WEIGHTS = WeightFile("sk_model2.pth", "lineart", ANNOTATORS_URL + "sk_model2.pth")


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
        from ..downloads import download_file, network_available
        if not self.allow_download:
            raise UserError(hint + ".", status=424)
        if not network_available(weights.url):
            raise UserError(hint + " (no internet connection was found to download it now).", status=424)
        log.info("downloading %s for the %s preprocessor", weights.filename, what)
        try:
            return download_file(weights.url, target, self.progress)
        except UserError as exc:
            raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=424) from exc

    def load(self, key: str, weights: WeightFile, what: str, build: Callable):
        """The network `build()` with the weights of `weights` loaded (cached per env)."""
        if key not in self.models:
            import torch

            from ..state_dict_io import read_state_dict
            path = self.weights_path(weights, what)
            sd = read_state_dict(path)
            net = build()
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise UserError(f"{path.name} does not fit the {what} network (missing {len(missing)}, unexpected "
                                f"{len(unexpected)} tensors, e.g. {', '.join(list(missing)[:2] + list(unexpected)[:2])}). "
                                f"The file may be damaged; delete it and try again.")
            net.eval().requires_grad_(False).to(self.device, torch.float32)
            self.models[key] = net
        return self.models[key]


def _env(kwargs) -> AnnotatorEnv:
    env = kwargs.get("env")
    if env is None:
        raise UserError("Model-based preprocessors run in the backend (no annotator folder was given).")
    return env


# -- HED ------------------------------------------------------------------------------------------
def _hed_network():
    import torch
    from torch import nn

    class ConvStage(nn.Module):
        """`layers` 3x3 conv + ReLU, with a 1x1 side output (named as in ControlNetHED.pth)."""

        def __init__(self, cin: int, cout: int, layers: int):
            super().__init__()
            self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
            self.projection = nn.Conv2d(cout, 1, 1)

        def forward(self, x, pool: bool):
            if pool:
                x = torch.nn.functional.max_pool2d(x, 2, 2)
            for conv in self.convs:
                x = torch.relu(conv(x))
            return x, self.projection(x)

    class HED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            self.block1 = ConvStage(3, 64, 2)
            self.block2 = ConvStage(64, 128, 2)
            self.block3 = ConvStage(128, 256, 3)
            self.block4 = ConvStage(256, 512, 3)
            self.block5 = ConvStage(512, 512, 3)

        def forward(self, x):
            h = x - self.norm
            sides = []
            for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
                h, side = block(h, i > 0)
                sides.append(side)
            return sides

    return HED()


def hed_edges(img: np.ndarray, env: AnnotatorEnv, *, safe: bool = False) -> np.ndarray:
    """Soft edges in 0..255 (H, W) uint8: the sigmoid of the mean of HED's five upsampled side outputs."""
    import torch
    import torch.nn.functional as F
    net = env.load("hed", HED_WEIGHTS, "HED soft edge", _hed_network)
    h, w = img.shape[:2]
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None].to(env.device)
    with torch.no_grad():
        sides = [F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False) for s in net(x)]
        edge = torch.sigmoid(torch.stack(sides).mean(dim=0))[0, 0].cpu().numpy()
    if safe:  # quantize to 3 levels, as "hed_safe" does, so the map carries less of the image
        edge = np.floor(edge * 3.0) / 2.0
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def _hed(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(hed_edges(padded, _env(kw))))


def _hed_safe(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(hed_edges(padded, _env(kw), safe=True)))


def _scribble_hed(img, res, a, b, seed, **kw):
    """HED edges thinned to strokes: non-maximum suppression, threshold, and a little dilation."""
    padded, remove_pad = resize_with_pad(img, res)
    edge = hed_edges(padded, _env(kw)).astype(np.float32)
    from .preprocessors import gaussian_blur
    smooth = gaussian_blur(edge, 3.0)
    keep = np.zeros_like(smooth, dtype=bool)
    p = np.pad(smooth, 1, mode="edge")
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        n1 = p[1 + dy:1 + dy + smooth.shape[0], 1 + dx:1 + dx + smooth.shape[1]]
        n2 = p[1 - dy:1 - dy + smooth.shape[0], 1 - dx:1 - dx + smooth.shape[1]]
        keep |= (smooth >= n1) & (smooth >= n2)
    strokes = ((keep & (smooth > 127)) * 255).astype(np.float32)
    thick = gaussian_blur(strokes, 3.0)
    dilated = (thick > 4).astype(np.uint8)
    return hwc3(remove_pad(dilated * 255))


# -- lineart ----------------------------------------------------------------------------------------
def _lineart_network():
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(True),
                                            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

        def forward(self, x):
            return x + self.conv_block(x)

    class LineGenerator(nn.Module):
        """Encoder (7x7, two stride-2 convs), 3 residual blocks, decoder (two transposed convs), 7x7 + sigmoid."""

        def __init__(self):
            super().__init__()
            self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(True))
            self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(True),
                                        nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU(True))
            self.model2 = nn.Sequential(*[Residual(256) for _ in range(3)])
            self.model3 = nn.Sequential(
                nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128), nn.ReLU(True),
                nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU(True))
            self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

        def forward(self, x):
            return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))

    return LineGenerator()


def lineart_lines(img: np.ndarray, env: AnnotatorEnv, *, coarse: bool = False) -> np.ndarray:
    """White lines on black (H, W) uint8 from the line generator (which draws black lines on white)."""
    import torch
    weights = LINEART_COARSE_WEIGHTS if coarse else LINEART_WEIGHTS
    net = env.load("lineart_coarse" if coarse else "lineart", weights, "lineart" + (" coarse" if coarse else ""),
                   _lineart_network)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(env.device)
    with torch.no_grad():
        line = net(x)[0, 0].cpu().numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


def _lineart(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, _env(kw))))


def _lineart_coarse(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, _env(kw), coarse=True)))


ANNOTATORS: list[Preprocessor] = [
    Preprocessor("hed", _hed, RES, model_free=False, aliases=("softedge_hed",), control_type="SoftEdge",
                 weights=(HED_WEIGHTS.filename,)),
    Preprocessor("hed_safe", _hed_safe, RES, model_free=False, aliases=("softedge_hedsafe",), control_type="SoftEdge",
                 weights=(HED_WEIGHTS.filename,)),
    Preprocessor("scribble_hed", _scribble_hed, RES, model_free=False, control_type="Scribble",
                 weights=(HED_WEIGHTS.filename,)),
    Preprocessor("lineart", _lineart, RES, model_free=False, aliases=("lineart_realistic",), control_type="Lineart",
                 weights=(LINEART_WEIGHTS.filename,)),
    Preprocessor("lineart_coarse", _lineart_coarse, RES, model_free=False, control_type="Lineart",
                 weights=(LINEART_COARSE_WEIGHTS.filename,)),
]
