"""The noise levels of a flow-matching model (FLUX.1, Stable Diffusion 3), in k-diffusion's form (engine: torch).

A latent at noise level sigma (0..1) is ``(1 - sigma) * x0 + sigma * noise``. The model was trained on
``sigma(t) = shift * t / (1 + (shift - 1) * t)`` for t in (0, 1]; `FlowSchedule` holds that curve at
t = i / 1000 (i = 1..1000) with the interface the schedule types of `backend.engine.schedules` read from a
`DiscreteSchedule` (the ascending `sigmas` table, `sigma_min`/`sigma_max`, `sigma_to_t`/`t_to_sigma` over the
table's index, `family`), so every schedule type but Align Your Steps works on it unchanged.

The shifts: SD3 and SD 3.5 3.0 (SAI's scheduler config); FLUX ``exp(mu)`` as Forge's and ComfyUI's
ModelSamplingFlux write it, with mu 1.15 for dev (and fine-tunes) and 1.0 for schnell.
"""
from __future__ import annotations

import math

import torch

__all__ = ["FlowSchedule", "SD3_SHIFT", "FLUX_DEV_MU", "FLUX_SCHNELL_MU", "default_shift"]

SD3_SHIFT = 3.0
FLUX_DEV_MU = 1.15
FLUX_SCHNELL_MU = 1.0
NUM_TIMESTEPS = 1000


def default_shift(variant: str) -> float:
    """The schedule shift a variant was trained with ("flux-schnell", "flux-dev", "sd3-medium", ...)."""
    if variant == "flux-schnell":
        return math.exp(FLUX_SCHNELL_MU)
    if variant.startswith("flux"):
        return math.exp(FLUX_DEV_MU)
    return SD3_SHIFT


class FlowSchedule:
    """The flow's noise levels: ``sigmas[i] = sigma((i + 1) / 1000)``, ascending; index i is the "timestep" the
    schedule types step over (0 .. 999). `family`: "flux" or "sd3"; `timestep_multiplier`: what the transformer
    is given per sigma (FLUX: sigma, the transformer scales it by 1000 itself; SD3: sigma * 1000)."""

    prediction_type = "flow"

    def __init__(self, shift: float, family: str = "flux", num_timesteps: int = NUM_TIMESTEPS):
        shift = float(shift)
        if not shift > 0:
            raise ValueError(f"the flow shift must be positive, got {shift}")
        if num_timesteps < 2:
            raise ValueError("a flow schedule needs at least two timesteps")
        self.shift = shift
        self.family = family
        self.timestep_multiplier = 1.0 if family == "flux" else 1000.0
        self._n = int(num_timesteps)
        t = torch.arange(1, self._n + 1, dtype=torch.float64) / self._n
        sig = self.sigma_at(t)
        self._sigmas64 = sig
        self._log_sigmas64 = sig.log()
        self.sigmas = sig.to(torch.float32)
        self.log_sigmas = self._log_sigmas64.to(torch.float32)
        self.sigma_min = float(sig[0])
        self.sigma_max = float(sig[-1])  # 1.0: pure noise

    @property
    def num_timesteps(self) -> int:
        return self._n

    def sigma_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma(t) = shift * t / (1 + (shift - 1) * t), t in [0, 1]."""
        t = torch.as_tensor(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def t_at(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The inverse: t(sigma) = sigma / (shift - (shift - 1) * sigma)."""
        sigma = torch.as_tensor(sigma)
        return sigma / (self.shift - (self.shift - 1) * sigma)

    @staticmethod
    def _work(value: torch.Tensor) -> torch.Tensor:
        return value.to(torch.float64 if value.dtype == torch.float64 else torch.float32)

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional table index of each sigma (exact inverse of `t_to_sigma`, clamped to [0, T-1])."""
        s = self._work(torch.as_tensor(sigma)).clamp(0, 1)
        return (self.t_at(s) * self._n - 1).clamp(0, self._n - 1)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at each fractional table index (index i is t = (i + 1) / T on the curve)."""
        tt = self._work(torch.as_tensor(t)).clamp(0, self._n - 1)
        return self.sigma_at((tt + 1) / self._n)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer is given at `sigma`."""
        return sigma * self.timestep_multiplier
