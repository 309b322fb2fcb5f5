"""HED soft edges (ControlNet 1.1's Apache-2.0 HED, `ControlNetHED.pth`): the network and the preprocessors
`hed` (`softedge_hed`), `hed_safe` (`softedge_hedsafe`, quantized to 3 levels) and `scribble_hed` (thinned strokes)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, AnnotatorEnv, WeightFile, env_from

HED_WEIGHTS = WeightFile("ControlNetHED.pth", "hed", ANNOTATORS_URL + "ControlNetHED.pth")


def network():
    """HED: five VGG-style conv stages, each with a 1x1 side output; keys as in `ControlNetHED.pth`."""
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
    net = env.load("hed", HED_WEIGHTS, "HED soft edge", network)
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
    return hwc3(remove_pad(hed_edges(padded, env_from(kw))))


def _hed_safe(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(hed_edges(padded, env_from(kw), safe=True)))


def _scribble_hed(img, res, a, b, seed, **kw):
    """HED edges thinned to strokes: non-maximum suppression, threshold, and a little dilation."""
    padded, remove_pad = resize_with_pad(img, res)
    edge = hed_edges(padded, env_from(kw)).astype(np.float32)
    from backend.engine.controlnet.preprocessors import gaussian_blur
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


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "hed": (_hed, None),
    "hed_safe": (_hed_safe, None),
    "scribble_hed": (_scribble_hed, None),
}
