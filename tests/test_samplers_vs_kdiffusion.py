"""Easel's sampler math against the `k-diffusion` package (Katherine Crowson's, which AUTOMATIC1111 runs).

Both run on the same small deterministic denoiser, the same sigmas, the same start and the same noise: a
Brownian path for the SDE samplers and a noise that is a function of the step's
(sigma, sigma_next) for the others, and for the churn of Euler/Heun/DPM2 one queue of draws both take from in
order (k-diffusion draws it with `torch.randn_like`, as A1111 hijacks it). In float64 the results agree to
rounding. UniPC, DDIM, PLMS, LCM and Restart are not in k-diffusion 0.1.1.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from backend.engine import samplers


def _kdiffusion_sampling():
    """k_diffusion.sampling without the package's __init__, which imports its training and evaluation tools
    (clean-fid, CLIP, wandb, ...) that the samplers do not need."""
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None and spec.submodule_search_locations, \
        "k-diffusion is a test dependency (requirements-test-nodeps.txt): pip install --no-deps k-diffusion"
    name = "_easel_test_k_diffusion"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(list(spec.submodule_search_locations)[0]))]
        sys.modules[name] = pkg
    return importlib.import_module(name + ".sampling")


K = _kdiffusion_sampling()
DTYPE = torch.float64


class TinyDenoiser:
    """A Karras-preconditioned denoiser around a fixed random conv: non-linear in x, smooth in sigma."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1234)
        self.w = torch.randn(4, 4, 3, 3, generator=gen, dtype=DTYPE) * 0.3
        self.b = torch.randn(4, generator=gen, dtype=DTYPE) * 0.1

    def __call__(self, x, sigma):
        s = sigma.to(DTYPE).reshape(-1, 1, 1, 1)
        c_in, c_skip, c_out = 1 / (s ** 2 + 1).sqrt(), 1 / (s ** 2 + 1), s / (s ** 2 + 1).sqrt()
        h = torch.nn.functional.conv2d(x * c_in, self.w, self.b, padding=1)
        return c_skip * x + c_out * torch.tanh(h + 0.1 * s.log())


def _sigmas(n=12, sigma_min=0.03, sigma_max=14.6):
    return K.get_sigmas_karras(n, sigma_min, sigma_max).to(DTYPE)


def _start(sigmas):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=DTYPE) * sigmas[0]


class PairNoise:
    """Standard normals that depend only on (sigma, sigma_next): the same for both samplers whatever their order."""

    def __init__(self, like):
        self.shape = like.shape

    def __call__(self, sigma, sigma_next):
        key = hash((round(float(sigma), 10), round(float(sigma_next), 10))) & 0x7FFFFFFF
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(key), dtype=DTYPE)


class ExactBrownian:
    """One Brownian path W(sigma) per image, exact on a fixed set of sigmas (the steps' sigmas and their
    log-midpoints, where DPM++ SDE evaluates): noise(a, b) = (W(b) - W(a)) / sqrt(|b - a|), as k-diffusion's
    BrownianTreeNoiseSampler gives it (whose tree answers only to within its tolerance of 1e-6)."""

    def __init__(self, like, sigmas):
        pos = [float(s) for s in sigmas if s > 0]
        times = sorted(set(pos) | {(a * b) ** 0.5 for a, b in zip(pos, pos[1:])})
        gen = torch.Generator().manual_seed(5)
        self.times = torch.tensor(times, dtype=DTYPE)
        steps = torch.randn((len(times) - 1, *like.shape), generator=gen, dtype=DTYPE)
        steps = steps * (self.times[1:] - self.times[:-1]).sqrt().reshape(-1, *([1] * like.ndim))
        self.w = torch.cat([torch.zeros((1, *like.shape), dtype=DTYPE), steps.cumsum(0)])

    def _at(self, t):
        i = int((self.times - float(t)).abs().argmin())
        assert abs(float(self.times[i]) - float(t)) <= 1e-9 * float(t), f"sigma {float(t)} is not on the path's grid"
        return self.w[i]

    def __call__(self, sigma, sigma_next):
        return (self._at(sigma_next) - self._at(sigma)) / abs(float(sigma_next) - float(sigma)) ** 0.5


def _close(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"max difference {float((a - b).abs().max())}"


ANCESTRAL = [("Euler a", "sample_euler_ancestral"), ("DPM2 a", "sample_dpm_2_ancestral"),
             ("DPM++ 2S a", "sample_dpmpp_2s_ancestral")]


@pytest.mark.parametrize("name,kname", [("Euler", "sample_euler"), ("Heun", "sample_heun"), ("DPM2", "sample_dpm_2"),
                                        ("LMS", "sample_lms"), ("DPM++ 2M", "sample_dpmpp_2m")])
def test_deterministic_samplers_match_kdiffusion(name, kname):
    model, sigmas = TinyDenoiser(), _sigmas()
    x = _start(sigmas)
    _close(samplers.SAMPLE_FUNCTIONS[name](model, x.clone(), sigmas), getattr(K, kname)(model, x.clone(), sigmas, disable=True))


@pytest.mark.parametrize("name,kname", ANCESTRAL)
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.6, 0.8)])
def test_ancestral_samplers_match_kdiffusion(name, kname, eta, s_noise):
    model, sigmas = TinyDenoiser(), _sigmas()
    x = _start(sigmas)
    noise = PairNoise(x)
    ours = samplers.SAMPLE_FUNCTIONS[name](model, x.clone(), sigmas, noise_sampler=noise, eta=eta, s_noise=s_noise)
    theirs = getattr(K, kname)(model, x.clone(), sigmas, disable=True, noise_sampler=noise, eta=eta, s_noise=s_noise)
    _close(ours, theirs)


@pytest.mark.parametrize("name,kname,extra", [
    ("DPM++ SDE", "sample_dpmpp_sde", {}),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {}),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {}),
])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.9)])
def test_sde_samplers_match_kdiffusion_on_one_brownian_path(name, kname, extra, eta, s_noise):
    model, sigmas = TinyDenoiser(), _sigmas()
    x = _start(sigmas)
    ours = samplers.SAMPLE_FUNCTIONS[name](model, x.clone(), sigmas, noise_sampler=ExactBrownian(x, sigmas),
                                           eta=eta, s_noise=s_noise)
    theirs = getattr(K, kname)(model, x.clone(), sigmas, disable=True, noise_sampler=ExactBrownian(x, sigmas),
                               eta=eta, s_noise=s_noise, **extra)
    _close(ours, theirs)


class _DrawQueue:
    """k-diffusion's `torch` with `randn_like` drawing from a seeded generator (what A1111's TorchHijack does)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.gen, dtype=x.dtype)

    def __getattr__(self, item):
        return getattr(torch, item)


@pytest.mark.parametrize("name,kname", [("Euler", "sample_euler"), ("Heun", "sample_heun"), ("DPM2", "sample_dpm_2")])
def test_churn_matches_kdiffusion(name, kname, monkeypatch):
    model, sigmas = TinyDenoiser(), _sigmas()
    x = _start(sigmas)
    knobs = dict(s_churn=3.0, s_tmin=0.2, s_tmax=8.0, s_noise=0.95)  # gamma 0 on the first and last steps
    ours_gen = torch.Generator().manual_seed(99)
    ours = samplers.SAMPLE_FUNCTIONS[name](model, x.clone(), sigmas, **knobs,
                                           noise_sampler=lambda s, sn: torch.randn(x.shape, generator=ours_gen, dtype=DTYPE))
    monkeypatch.setattr(K, "torch", _DrawQueue(99))
    theirs = getattr(K, kname)(model, x.clone(), sigmas, disable=True, **knobs)
    _close(ours, theirs)
    monkeypatch.undo()
    plain = samplers.SAMPLE_FUNCTIONS[name](model, x.clone(), sigmas)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the churn did something


def _t(value):
    """A float64 sigma for k-diffusion's DPM fast/adaptive (given a float, it computes in float32)."""
    return torch.tensor(value, dtype=DTYPE)


@pytest.fixture
def float64_default():
    """k-diffusion's DPM fast builds its grid with torch.linspace in the default dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(saved)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_matches_kdiffusion(eta, float64_default):
    """Easel's DPM fast on a schedule that stops at sigma_min is k-diffusion's sample_dpm_fast with n steps."""
    model = TinyDenoiser()
    n, sigma_min, sigma_max = 10, 0.05, 14.6
    sigmas = torch.tensor([sigma_max] + [0.5] * (n - 1) + [sigma_min], dtype=DTYPE)  # only the ends are used
    x = _start(sigmas)
    noise = PairNoise(x)
    ours = samplers.sample_dpm_fast(model, x.clone(), sigmas, noise_sampler=noise, eta=eta, s_noise=0.9)
    theirs = K.sample_dpm_fast(model, x.clone(), _t(sigma_min), _t(sigma_max), n, disable=True, noise_sampler=noise, eta=eta,
                               s_noise=0.9)
    _close(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive_matches_kdiffusion(eta, float64_default):
    model = TinyDenoiser()
    sigma_min, sigma_max = 0.05, 14.6
    sigmas = torch.tensor([sigma_max, 1.0, sigma_min], dtype=DTYPE)
    x = _start(sigmas)
    noise = PairNoise(x)
    ours = samplers.sample_dpm_adaptive(model, x.clone(), sigmas, noise_sampler=noise, eta=eta, s_noise=0.9)
    theirs = K.sample_dpm_adaptive(model, x.clone(), _t(sigma_min), _t(sigma_max), disable=True, noise_sampler=noise, eta=eta,
                                   s_noise=0.9)
    _close(ours, theirs)
