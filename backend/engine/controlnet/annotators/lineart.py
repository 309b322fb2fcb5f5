"""The line generator of ControlNet 1.1's lineart (`sk_model.pth`, `sk_model2.pth` for coarse lines): the network
and the preprocessors `lineart` (`lineart_realistic`) and `lineart_coarse`, white lines on black."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, AnnotatorEnv, WeightFile, env_from

LINEART_WEIGHTS = WeightFile("sk_model.pth", "lineart", ANNOTATORS_URL + "sk_model.pth")
LINEART_COARSE_WEIGHTS = WeightFile("sk_model2.pth", "lineart", ANNOTATORS_URL + "sk_model2.pth")


def network():
    """The line generator of `sk_model.pth` / `sk_model2.pth` (both files share its layout)."""
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
                   network)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(env.device)
    with torch.no_grad():
        line = net(x)[0, 0].cpu().numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


def _lineart(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, env_from(kw))))


def _lineart_coarse(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, env_from(kw), coarse=True)))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "lineart": (_lineart, None),
    "lineart_coarse": (_lineart_coarse, None),
}
