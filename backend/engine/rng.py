"""Seeds and noise, as AUTOMATIC1111 makes them.

Every image of a batch has its own CPU generator seeded with its own seed, so
image i of a batch (seed + i) is the same as that seed generated alone, and the
result does not depend on the device. Variation seeds blend two noises with slerp.
"""
from __future__ import annotations

import random

import torch

MAX_SEED = 4294967294


def fix_seed(seed: int | None) -> int:
    """-1 (or None, or any negative) means a random seed."""
    if seed is None or int(seed) < 0:
        return int(random.randrange(MAX_SEED))
    return int(seed)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - val) + high * val
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _paste_centered(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Put `source` ([C,h,w]) in the middle of `target` ([C,H,W]), cropping where it is larger."""
    dx = (target.shape[2] - source.shape[2]) // 2
    dy = (target.shape[1] - source.shape[1]) // 2
    w = source.shape[2] if dx >= 0 else source.shape[2] + 2 * dx
    h = source.shape[1] if dy >= 0 else source.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = target.clone()
    out[:, ty:ty + h, tx:tx + w] = source[:, sy:sy + h, sx:sx + w]
    return out


class ImageRNG:
    """Per-image generators for one batch: `first()` gives the initial noise, `next()` the noise samplers draw."""

    def __init__(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0):
        self.shape = tuple(shape)
        self.seeds = list(seeds)
        self.subseeds = list(subseeds) if subseeds else [0] * len(seeds)
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h or 0)
        self.seed_resize_from_w = int(seed_resize_from_w or 0)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def first(self) -> torch.Tensor:
        c, h, w = self.shape
        noise_shape = self.shape
        if self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0:
            noise_shape = (c, self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)
        out = []
        for i, gen in enumerate(self.generators):
            if self.subseed_strength > 0:
                subnoise = torch.randn(noise_shape, generator=torch.Generator("cpu").manual_seed(self.subseeds[i]))
            noise = torch.randn(noise_shape, generator=gen)
            if self.subseed_strength > 0:
                noise = slerp(self.subseed_strength, noise.reshape(1, -1), subnoise.reshape(1, -1)).reshape(noise_shape)
            if noise_shape != self.shape:
                base = torch.randn(self.shape, generator=torch.Generator("cpu").manual_seed(self.seeds[i]))
                noise = _paste_centered(base, noise)
            out.append(noise)
        return torch.stack(out)

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
