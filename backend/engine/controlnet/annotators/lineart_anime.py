"""The anime line model (`netG.pth`): a pix2pix U-Net (8 downsamplings, 64 base channels, instance norm) and the
`lineart_anime` preprocessor, white lines on black, run at multiples of 256 pixels."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, WeightFile, env_from, resize_maps

LINEART_ANIME_WEIGHTS = WeightFile("netG.pth", "lineart_anime", ANNOTATORS_URL + "netG.pth")


def network():
    """pix2pix's U-Net generator as `netG.pth` holds it (3 channels in, 1 out, 8 downsamplings)."""
    import torch
    from torch import nn

    class Skip(nn.Module):
        """One level of the U-Net: down, the inner levels, up; its input is concatenated to its output
        except at the outermost level. The layer order fixes the weight names of `netG.pth`."""

        def __init__(self, outer: int, inner: int, sub: nn.Module | None = None, in_channels: int | None = None,
                     outermost: bool = False):
            super().__init__()
            self.outermost = outermost
            down = nn.Conv2d(in_channels or outer, inner, 4, 2, 1, bias=True)
            if outermost:
                layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
            elif sub is None:  # innermost
                layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=True),
                          nn.InstanceNorm2d(outer)]
            else:
                layers = [nn.LeakyReLU(0.2, True), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(True),
                          nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=True), nn.InstanceNorm2d(outer)]
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)

    class UnetGenerator(nn.Module):
        def __init__(self, ngf: int = 64, num_downs: int = 8):
            super().__init__()
            block = Skip(ngf * 8, ngf * 8)
            for _ in range(num_downs - 5):
                block = Skip(ngf * 8, ngf * 8, block)
            block = Skip(ngf * 4, ngf * 8, block)
            block = Skip(ngf * 2, ngf * 4, block)
            block = Skip(ngf, ngf * 2, block)
            self.model = Skip(1, ngf, block, in_channels=3, outermost=True)

        def forward(self, x):
            return self.model(x)

    return UnetGenerator()


def _lineart_anime_keys(net, sd: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _lineart_anime(img, res, a, b, seed, **kw):
    """White lines on black from the anime line model (which draws black lines on white, in -1..1), run at
    multiples of 256 pixels as its eight halvings need."""
    import torch
    env = env_from(kw)
    net = env.load("lineart_anime", LINEART_ANIME_WEIGHTS, "lineart_anime", network,
                   remap=_lineart_anime_keys)
    padded, remove_pad = resize_with_pad(img, res)
    h, w = padded.shape[:2]
    hn, wn = -(-h // 256) * 256, -(-w // 256) * 256
    x = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = resize_maps(x, hn, wn).to(env.device)
    with torch.no_grad():
        line = net(x)[:, :1].float().cpu() * 127.5 + 127.5
    line = resize_maps(line, h, w)[0, 0].numpy().clip(0, 255).astype(np.uint8)
    return hwc3(remove_pad(255 - line))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "lineart_anime": (_lineart_anime, None),
}
