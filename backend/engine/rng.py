"""Seeds and noise, as AUTOMATIC1111 makes them.

Every image of a batch has its own generator seeded with its own seed, so image i of a batch (seed + i) is the
same as that seed generated alone. Where the numbers come from is the setting ``randn_source`` (A1111's):

* ``"GPU"`` (the default): torch's generator of the device that samples (CUDA's on an NVIDIA card); on the CPU,
  and on Apple's MPS as A1111 does, torch's CPU generator.
* ``"CPU"``: torch's CPU generator, whatever the device (the same pictures on every machine).
* ``"NV"``: `PhiloxGenerator`, A1111's emulation of CUDA's generator on the CPU (Philox 4x32-10 and Box-Muller),
  so a CPU or a Mac gives the pictures an NVIDIA card gives.

`ImageRNG.first()` is the initial noise (with variation seeds and "resize seed from"); `next()` the noise the
samplers draw during sampling. With ``eta_noise_seed_delta`` (ENSD) non-zero, that sampler noise comes from
generators seeded with seed + ENSD, as A1111 reseeds them after the first draw.
"""
from __future__ import annotations

import random
from typing import Sequence, Union

import numpy as np
import torch

MAX_SEED = 4294967294
RANDN_SOURCES = ("GPU", "CPU", "NV")


def fix_seed(seed: int | None) -> int:
    """-1 (or None, or any negative) means a random seed."""
    if seed is None or int(seed) < 0:
        return int(random.randrange(MAX_SEED))
    return int(seed)


# ---------------------------------------------------------------------------------------------------------------
# Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011), as CUDA's curand uses it
# ---------------------------------------------------------------------------------------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (Weyl) constants
_MASK32 = 0xFFFFFFFF


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32 on a [4, N] uint32 array of counters with one 64-bit key (two 32-bit words) -> [4, N] uint32."""
    c0, c1, c2, c3 = (np.asarray(counter[i], dtype=np.uint32) for i in range(4))
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    shift, low = np.uint64(32), np.uint64(_MASK32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        p0 = c0.astype(np.uint64) * m0
        p1 = c2.astype(np.uint64) * m1
        hi0, lo0 = (p0 >> shift).astype(np.uint32), (p0 & low).astype(np.uint32)
        hi1, lo1 = (p1 >> shift).astype(np.uint32), (p1 & low).astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
    return np.stack([c0, c1, c2, c3])


# Box-Muller constants as A1111's emulation holds them: 2^-32 and 2^-32 * 2pi rounded to float32.
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def _box_muller_first(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first of Box-Muller's two normals from two uint32 words: u, v centred in their 2^-32 cells (float32
    constants, float64 arithmetic, rounded to float32 at the end, as A1111's numpy emulation computes it)."""
    u = x.astype(np.float64) * _TWO_POW32_INV + float(np.float32(_TWO_POW32_INV) / np.float32(2))
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + float(np.float32(_TWO_POW32_INV_2PI) / np.float32(2))
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """Standard normals as ``torch.randn(..., device="cuda")`` gives them for a seed, computed on the CPU
    (A1111's "NV" source). Each `randn` call is one CUDA "offset": number i of a call comes from Philox with
    counter (offset, 0, i, 0) and the seed as key; the next call moves to the next offset."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset & _MASK32
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        seed = self.seed & 0xFFFFFFFFFFFFFFFF
        words = philox4x32(counter, (seed & _MASK32, seed >> 32))
        return _box_muller_first(words[0], words[1]).reshape(tuple(shape))


Generator = Union[torch.Generator, PhiloxGenerator]


def generator_device(source: str, device: torch.device | str | None) -> torch.device:
    """Where torch's generator lives for `source` ("GPU": the sampling device, but the CPU for cpu/mps; "CPU")."""
    device = torch.device(device or "cpu")
    if source == "GPU" and device.type not in ("cpu", "mps"):
        return device
    return torch.device("cpu")


def create_generator(seed: int, source: str = "GPU", device: torch.device | str | None = None) -> Generator:
    if source not in RANDN_SOURCES:
        raise ValueError(f"randn_source must be one of {', '.join(RANDN_SOURCES)}, not {source!r}")
    if source == "NV":
        return PhiloxGenerator(seed)
    # torch takes 64-bit seeds: a seed + ENSD past that wraps around (as Philox's key does)
    return torch.Generator(generator_device(source, device)).manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)


def randn(generator: Generator, shape: Sequence[int]) -> torch.Tensor:
    """float32 standard normals from `generator` (on the generator's device; a Philox one gives CPU tensors)."""
    if isinstance(generator, PhiloxGenerator):
        return torch.from_numpy(generator.randn(shape))
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two noises for variation seeds. The norms and angles are taken along
    dim 1 (for one image's [C, H, W] noise: each channel's columns), and a nearly parallel pair is mixed linearly
    with A1111's weights (``low * val + high * (1 - val)``)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
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
    """Per-image generators for one batch: `first()` gives the initial noise, `next()` the noise samplers draw.

    `source`: the ``randn_source`` setting; `device`: where the sampling runs (the "GPU" source uses its
    generator); `ensd`: ``eta_noise_seed_delta``, the offset of the seeds of the sampler noise. Tensors come back
    on the CPU or the generator's device; the pipelines move them to the sampling device.
    """

    def __init__(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0, *,
                 source: str = "GPU", device: torch.device | str | None = None, ensd: int = 0):
        self.shape = tuple(shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h or 0)
        self.seed_resize_from_w = int(seed_resize_from_w or 0)
        self.source = source
        self.device = device
        self.ensd = int(ensd or 0)
        self.generators = [self._generator(s) for s in self.seeds]

    def _generator(self, seed: int) -> Generator:
        return create_generator(seed, self.source, self.device)

    def first(self) -> torch.Tensor:
        """The initial noise, in A1111's order of draws: the variation seed's noise and a resized seed's noise from
        fresh generators, the image's own generator for its full-size noise; then the sampler noise's generators
        move to seed + ENSD when ENSD is set."""
        c, h, w = self.shape
        resized = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        noise_shape = (c, self.seed_resize_from_h // 8, self.seed_resize_from_w // 8) if resized else self.shape
        out = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = int(self.subseeds[i]) if i < len(self.subseeds) else 0
                subnoise = randn(self._generator(subseed), noise_shape)
            if noise_shape != self.shape:
                noise = randn(self._generator(seed), noise_shape)
            else:
                noise = randn(gen, self.shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise.to(noise.device))
            if noise_shape != self.shape:
                noise = _paste_centered(randn(gen, self.shape), noise)
            out.append(noise.to("cpu"))
        if self.ensd:
            self.generators = [self._generator(s + self.ensd) for s in self.seeds]
        return torch.stack(out)

    def next(self) -> torch.Tensor:
        return torch.stack([randn(g, self.shape).to("cpu") for g in self.generators])


class BrownianNoise:
    """The noise A1111 gives the SDE samplers (DPM++ SDE, 2M SDE, 3M SDE): k-diffusion's BrownianTreeNoiseSampler,
    one torchsde Brownian tree per image seeded with the image's seed (not seed + ENSD, whatever `randn_source`
    says), spanning the whole schedule's smallest non-zero sigma to its largest. ``noise(sigma, sigma_next)`` is
    the path's increment between the two, divided by the square root of the interval: standard normal, and the
    draws of one step are pieces of one path (what DPM++ SDE's two stages rely on).

    `like`: the batch's latents (shape, dtype, device); `sigma_max`: the top of the whole schedule when `sigmas`
    is a cut of it (img2img, hires. fix). The trees are built on the first draw (a sampler that draws nothing
    needs none)."""

    def __init__(self, like: torch.Tensor, sigmas, seeds: Sequence[int], sigma_max: float | None = None):
        values = [float(s) for s in torch.as_tensor(sigmas).detach().reshape(-1).tolist()]
        self.t0 = min(s for s in values if s > 0)
        self.t1 = max(values + ([float(sigma_max)] if sigma_max is not None else []))
        self.like = like
        self.seeds = [int(s) for s in seeds]
        self.trees = None

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        if self.trees is None:
            import torchsde  # only the SDE samplers need it
            w0 = torch.zeros_like(self.like[0])
            self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=s) for s in self.seeds]
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        # the interval in the latents' precision, as k-diffusion computes it from the sigma tensors
        interval = torch.tensor(hi, dtype=w.dtype) - torch.tensor(lo, dtype=w.dtype)
        return w / interval.abs().sqrt().to(w.device)
