"""Noise schedules, in k-diffusion's formulation (engine: torch).

A latent ``x`` at noise level ``sigma`` is ``x0 + sigma * eps``. This module holds the model's discrete
noise levels and the "Schedule type" functions that pick the sigmas a sampler walks through:

``DiscreteSchedule``
    The model's discrete noise levels (from ``alphas_cumprod``), with
    ``sigma_to_t``/``t_to_sigma`` conversions between sigma and the (fractional)
    UNet timestep.
``SCHEDULE_FUNCTIONS``
    Schedule-type name (as in ``backend.core.sampler_catalog.SCHEDULERS``) -> ``fn(n, model_schedule)``.
``get_sigmas(schedule, steps, model_schedule, sampler)``
    ``steps + 1`` descending sigmas ending in 0, for a schedule and sampler.

The names, labels and aliases of the schedule types are in ``backend.core.sampler_catalog`` (torch-free).
The module holds constant tables only: no state is shared between calls.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

from backend.core.errors import UserError
from backend.core.sampler_catalog import SamplerInfo, find_sampler, find_scheduler

__all__ = [
    "DiscreteSchedule", "SCHEDULE_FUNCTIONS", "get_sigmas",
    "sigmas_karras", "sigmas_exponential", "sigmas_polyexponential", "sigmas_kl_optimal", "sigmas_beta",
    "sigmas_align_your_steps", "beta_ppf", "model_schedule",
]


# ---------------------------------------------------------------------------
# The model's discrete noise levels
# ---------------------------------------------------------------------------

class DiscreteSchedule:
    """Noise levels of a discrete-time (DDPM-trained) model.

    ``sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`` ascending
    with the timestep ``t``; between timesteps, sigma is interpolated linearly
    in log-sigma (k-diffusion's DiscreteSchedule).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float], family: str = "sd1"):
        self.family = family  # the model family ("sd1", "sd2", "sdxl"): Align Your Steps has a table per family
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least two entries")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        self.alphas_cumprod = ac
        sig = ((1.0 - ac) / ac).sqrt()
        if not bool((sig[1:] > sig[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self._sigmas64 = sig
        self._log_sigmas64 = sig.log()
        self.sigmas = sig.to(torch.float32)
        self.log_sigmas = self._log_sigmas64.to(torch.float32)
        self.sigma_min = float(sig[0])
        self.sigma_max = float(sig[-1])
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000,
                   schedule: str = "scaled_linear") -> "DiscreteSchedule":
        """Stable Diffusion's training schedule ("scaled_linear"), or a plain "linear" one."""
        if schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        elif schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta schedule {schedule!r} (expected 'scaled_linear' or 'linear')")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def _log_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._log_sigmas64.to(device=device, dtype=dtype)
            self._tables[key] = table
        return table

    @staticmethod
    def _work_dtype(value: torch.Tensor) -> torch.dtype:
        return torch.float64 if value.dtype == torch.float64 else torch.float32

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of each sigma (log-sigma interpolation, clamped to [0, T-1])."""
        sigma = torch.as_tensor(sigma)
        dtype = self._work_dtype(sigma)
        log_sigmas = self._log_table(sigma.device, dtype)
        s = sigma.to(dtype).reshape(-1)
        log_s = s.clamp(min=0).log()  # sigma 0 -> -inf -> t 0
        n = log_sigmas.shape[0]
        low = (torch.searchsorted(log_sigmas, log_s.contiguous(), right=True) - 1).clamp(0, n - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return (low.to(dtype) + w).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at each fractional timestep (log-sigma interpolation)."""
        t = torch.as_tensor(t)
        dtype = self._work_dtype(t)
        log_sigmas = self._log_table(t.device, dtype)
        n = log_sigmas.shape[0]
        tt = t.to(dtype).reshape(-1).clamp(0, n - 1)
        low = tt.floor().long().clamp(max=n - 2)
        w = tt - low.to(dtype)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return log_sigma.exp().reshape(t.shape)


def model_schedule(model) -> "DiscreteSchedule":
    """The noise levels a model was trained on: a flow-matching model's (FLUX, SD3: `prediction_type` "flow")
    `FlowSchedule` with its shift, else the `DiscreteSchedule` of its alphas_cumprod."""
    if getattr(model, "prediction_type", None) == "flow":
        from backend.engine.families.flow_schedule import FlowSchedule
        return FlowSchedule(model.shift, family=model.family)
    return DiscreteSchedule(model.alphas_cumprod, family=model.family)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------

def _append_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(1)])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): n sigmas evenly spaced in sigma**(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log-sigma, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """n sigmas with log-sigma following a polynomial in the step (rho=1: exponential), then 0."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((ramp * (hi - lo) + lo).exp())


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """"Align Your Steps"' KL-optimal schedule: n sigmas evenly spaced in arctan(sigma), then 0."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    frac = torch.arange(n, dtype=torch.float64) / (n - 1)
    angles = frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)
    return _append_zero(angles.tan())


def _log_beta_fn(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _betainc_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        # even term
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        # odd term
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return f


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta_fn(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_cf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _betainc_cf(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of the Beta(a, b) distribution (safeguarded Newton on I_x(a, b) = q)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    x = 0.5
    log_b = _log_beta_fn(a, b)
    for _ in range(200):
        err = _betainc(x, a, b) - q
        if err > 0:
            hi = x
        else:
            lo = x
        if abs(err) < 1e-15 or hi - lo < 1e-15:
            break
        pdf = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_b)
        step = err / pdf if pdf > 0 and math.isfinite(pdf) else float("nan")
        new = x - step
        if not (lo < new < hi):  # Newton left the bracket: bisect instead
            new = 0.5 * (lo + hi)
        if abs(new - x) < 1e-16:
            break
        x = new
    return x


def sigmas_beta(n: int, model_schedule: "DiscreteSchedule", alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """"Beta Sampling is All You Need" (Lee et al. 2024): n timesteps from t_max down to t_min placed at the
    Beta(alpha, beta) quantiles of evenly spaced levels (dense at both ends), as sigmas, then 0."""
    levels = torch.linspace(1, 0, n, dtype=torch.float64).tolist() if n > 1 else [1.0]
    frac = torch.tensor([beta_ppf(q, alpha, beta) for q in levels], dtype=torch.float64)
    t_max = float(model_schedule.sigma_to_t(torch.tensor(model_schedule.sigma_max, dtype=torch.float64)))
    t_min = float(model_schedule.sigma_to_t(torch.tensor(model_schedule.sigma_min, dtype=torch.float64)))
    return _append_zero(model_schedule.t_to_sigma(t_min + frac * (t_max - t_min)))


LCM_ORIGINAL_STEPS = 50  # the timesteps LCM models are distilled on (LCMScheduler's original_inference_steps)


def sigmas_lcm(n: int, ms: DiscreteSchedule, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """The noise levels of diffusers' `LCMScheduler` (its authors' sampling of LCM checkpoints and LCM-LoRAs): n of
    the `original_steps` timesteps the model was distilled on (T/50 * k - 1: 999, 979, ... 19), evenly spread from
    the top (4 steps: 999, 759, 499, 259), then 0. The "LCM" sampler's Automatic schedule for up to 50 steps."""
    skip = ms.num_timesteps // original_steps
    origin = torch.arange(original_steps, 0, -1, dtype=torch.int64) * skip - 1
    index = torch.floor(torch.linspace(0, original_steps, n + 1, dtype=torch.float64)[:-1]).long()
    return _append_zero(ms._sigmas64[origin[index]])


def _sched_uniform(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    t = torch.linspace(ms.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(ms.t_to_sigma(t))


def _sched_sgm_uniform(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    t = torch.linspace(ms.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(ms.t_to_sigma(t))


def _sched_normal(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    start = ms.sigma_to_t(torch.tensor(ms.sigma_max, dtype=torch.float64))
    end = ms.sigma_to_t(torch.tensor(ms.sigma_min, dtype=torch.float64))
    t = torch.linspace(float(start), float(end), n, dtype=torch.float64)
    return _append_zero(ms.t_to_sigma(t))


def _sched_simple(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    table = ms._sigmas64
    stride = table.shape[0] / n
    idx = [table.shape[0] - 1 - int(i * stride) for i in range(n)]
    return _append_zero(table[idx])


def _sched_ddim(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    """CompVis DDIM's discretization: timesteps 0, c, 2c, ... (c = T // n), shifted by +1, reversed."""
    table = ms._sigmas64
    total = table.shape[0]
    if n < total:
        c = total // n
        idx = [min(1 + i * c, total - 1) for i in range(n)]
        sig = table[idx].flip(0)
    else:  # more steps than timesteps: fall back to an even spread of fractional timesteps
        sig = ms.t_to_sigma(torch.linspace(total - 1, 1, n, dtype=torch.float64))
    return _append_zero(sig)


def _sched_karras(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_karras(n, ms.sigma_min, ms.sigma_max, rho=7.0)


def _sched_exponential(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_exponential(n, ms.sigma_min, ms.sigma_max)


def _sched_polyexponential(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_polyexponential(n, ms.sigma_min, ms.sigma_max, rho=1.0)


def _sched_kl_optimal(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_kl_optimal(n, ms.sigma_min, ms.sigma_max)


def _sched_beta(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_beta(n, ms)


# NVIDIA's "Align Your Steps" 10-step noise levels (Sabour et al., 2024), per model family.
AYS_NOISE_LEVELS = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def sigmas_align_your_steps(n: int, family: str = "sd1") -> torch.Tensor:
    """Align Your Steps: the family's optimized noise levels, resampled to n levels by linear interpolation
    of log-sigma over an even grid (as the paper's how-to does, and A1111), then 0."""
    table = "sdxl" if family in ("sdxl", "sdxl_refiner") else "sd1"
    levels = torch.tensor(AYS_NOISE_LEVELS[table], dtype=torch.float64)
    if n != levels.numel():
        grid = torch.linspace(0, 1, levels.numel(), dtype=torch.float64)
        wanted = torch.linspace(0, 1, n, dtype=torch.float64)
        logs = levels.log()
        # piecewise-linear interpolation of log-sigma at `wanted`
        idx = torch.clamp(torch.searchsorted(grid, wanted, right=True) - 1, 0, levels.numel() - 2)
        frac = (wanted - grid[idx]) / (grid[idx + 1] - grid[idx])
        levels = (logs[idx] + frac * (logs[idx + 1] - logs[idx])).exp()
    return _append_zero(levels)


def _sched_align_your_steps(n: int, ms: DiscreteSchedule) -> torch.Tensor:
    return sigmas_align_your_steps(n, getattr(ms, "family", "sd1"))


SCHEDULE_FUNCTIONS: Mapping[str, Callable[[int, DiscreteSchedule], torch.Tensor]] = MappingProxyType({
    "uniform": _sched_uniform,
    "karras": _sched_karras,
    "exponential": _sched_exponential,
    "polyexponential": _sched_polyexponential,
    "sgm_uniform": _sched_sgm_uniform,
    "kl_optimal": _sched_kl_optimal,
    "simple": _sched_simple,
    "normal": _sched_normal,
    "ddim": _sched_ddim,
    "beta": _sched_beta,
    "align_your_steps": _sched_align_your_steps,
})


def get_sigmas(schedule: str | None, steps: int, model_schedule: DiscreteSchedule,
               sampler: "str | SamplerInfo | None" = None) -> torch.Tensor:
    """``steps + 1`` sigmas, descending, ending in 0, float32 on the CPU.

    ``schedule`` is a schedule name or label (None/"automatic": the sampler's
    default). For samplers with ``discard_next_to_last_sigma`` (DPM2, DPM2 a,
    DPM++ 3M SDE) the schedule is computed for ``steps + 1`` and its
    next-to-last sigma dropped, as A1111 does.
    """
    steps = int(steps)
    if steps < 1:
        raise UserError(f"Sampling steps must be at least 1, got {steps}.")
    info = sampler if isinstance(sampler, SamplerInfo) else (find_sampler(sampler) if sampler else None)
    sched = find_scheduler(schedule or "automatic")
    if sched.fn is None:
        if (info is not None and info.name == "LCM" and isinstance(model_schedule, DiscreteSchedule)
                and steps <= LCM_ORIGINAL_STEPS):
            return sigmas_lcm(steps, model_schedule).to(torch.float32)  # the LCM timesteps, as LCMScheduler
        sched = find_scheduler(info.default_scheduler if info is not None else "uniform")
    if sched.name == "align_your_steps" and getattr(model_schedule, "prediction_type", None) == "flow":
        raise UserError("The Align Your Steps schedule has noise levels for SD 1.x and SDXL only; FLUX and SD3 "
                        "sample on a flow (noise levels 0 to 1): use Simple, Beta, Uniform, SGM Uniform, Normal, "
                        "Karras, Exponential or KL Optimal.")
    discard = info is not None and info.discard_next_to_last_sigma
    sigmas = sched.fn(steps + 1 if discard else steps, model_schedule)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.to(torch.float32)
