"""The samplers' math, in k-diffusion's formulation (engine: torch).

Everything here works in "sigma space": a latent ``x`` at noise level ``sigma``
is ``x0 + sigma * eps``, and the model is wrapped as a *denoiser*
``model(x, sigma_batch) -> denoised`` that returns its prediction of ``x0``
(``sigma_batch`` is the current sigma broadcast to shape ``[batch]``). The
pipelines build that wrapper (classifier-free guidance, eps/v prediction) and
start sampling from ``sigmas[0] * noise``.

``SAMPLE_FUNCTIONS`` maps each sampler name of ``backend.core.sampler_catalog.SAMPLERS`` (the torch-free
name catalog) to its function; the sigmas come from ``backend.engine.schedules.get_sigmas``.

Every sample function has the signature::

    sample_fn(model, x, sigmas, *, noise_sampler, callback,
              eta=1.0, s_churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0) -> x

``noise_sampler(sigma, sigma_next)`` returns a standard-normal tensor shaped
like ``x`` (the pipeline draws it from per-image seeded generators, so results
are reproducible; the SDE samplers use it in place of a Brownian tree, and DPM++ SDE
combines its two draws per step as increments of one Brownian path in sigma). It is
only called when the drawn noise is actually used, so with ``eta=0`` or
``s_churn=0`` nothing is drawn (ancestral steps into ``sigma == 0`` draw
nothing either); with ``s_churn > 0`` one draw is made every step, as A1111
does. ``None`` falls back to ``torch.randn_like``. ``callback(dict(i, x,
sigma, sigma_hat, denoised))`` is called once per step, after the step, with
``i`` from 0 to ``len(sigmas) - 2``; an exception raised by it stops sampling
and propagates. Scalar step coefficients are computed in float64 on the host;
the tensors keep the dtype and device of ``x``.

The module holds constant tables only: no state is shared between calls.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

from backend.engine.schedules import sigmas_karras

__all__ = [
    "SAMPLE_FUNCTIONS", "get_ancestral_step", "to_d", "dpm_fast_orders",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde", "sample_ddim", "sample_plms", "sample_unipc",
    "sample_lcm", "sample_restart", "sample_dpm_fast", "sample_dpm_adaptive",
]

NoiseSampler = Callable[[float, float], torch.Tensor]
StepCallback = Callable[[dict], None]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



# ---------------------------------------------------------------------------
# Shared step helpers
# ---------------------------------------------------------------------------

def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) for an ancestral step: go deterministically to sigma_down, then add
    sigma_up of fresh noise, so that sigma_down**2 + sigma_up**2 == sigma_to**2."""
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if not eta or sigma_to <= 0 or sigma_from <= 0:
        return sigma_to, 0.0
    var = sigma_to ** 2 * max(sigma_from ** 2 - sigma_to ** 2, 0.0) / sigma_from ** 2
    sigma_up = min(sigma_to, eta * math.sqrt(var))
    sigma_down = math.sqrt(max(sigma_to ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma (= the model's eps prediction)."""
    return (x - denoised) / sigma


def _sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1).tolist()
    if len(values) < 2:
        raise ValueError("sigmas needs at least two values (one step)")
    return values


def _denoise(model: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return model(x, x.new_full((x.shape[0],), sigma))


def _noise(noise_sampler: NoiseSampler | None, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    if noise_sampler is None:
        return torch.randn_like(x)
    return noise_sampler(sigma, sigma_next)


def _report(callback: StepCallback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor,
            sigma_hat: float | None = None) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def _lerp_to(denoised: torch.Tensor, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """First-order exponential-integrator step in sigma space: x0 + (sigma_to / sigma_from) * (x - x0).
    (DDIM, DPM-Solver++(1) and Euler all reduce to this.)"""
    return denoised + ratio * (x - denoised)


def _churn(x: torch.Tensor, sigma: float, n: int, noise_sampler: NoiseSampler | None, sigma_next: float,
           s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al.'s "churn": raise the noise level from sigma to sigma_hat by adding fresh noise."""
    if s_churn <= 0:
        return x, sigma
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = _noise(noise_sampler, x, sigma, sigma_next)  # drawn every step, as A1111 does
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)
    return x, sigma_hat


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE (Karras et al. Algorithm 2 with optional churn)."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        x, s_hat = _churn(x, s, n, noise_sampler, sn, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(model, x, s_hat)
        x = _lerp_to(denoised, x, sn / s_hat)
        _report(callback, i, x, s, denoised, s_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                           s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps down to sigma_down, then fresh noise back up to the next sigma."""
    sig = _sigma_list(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        down, up = get_ancestral_step(s, sn, eta)
        x = _lerp_to(denoised, x, down / s)
        if sn > 0 and up > 0:
            x = x + _noise(noise_sampler, x, s, sn) * (s_noise * up)
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. Algorithm 2); Euler for the last step into sigma 0."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        x, s_hat = _churn(x, s, n, noise_sampler, sn, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(model, x, s_hat)
        d = to_d(x, s_hat, denoised)
        dt = sn - s_hat
        if sn == 0:
            x = denoised
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sn, _denoise(model, x_2, sn))
            x = x + (d + d_2) * (0.5 * dt)
        _report(callback, i, x, s, denoised, s_hat)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 as in k-diffusion: midpoint (in log-sigma) second-order step."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        x, s_hat = _churn(x, s, n, noise_sampler, sn, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _denoise(model, x, s_hat)
        if sn == 0:
            x = denoised
        else:
            d = to_d(x, s_hat, denoised)
            s_mid = math.sqrt(s_hat * sn)
            x_2 = x + d * (s_mid - s_hat)
            d_2 = to_d(x_2, s_mid, _denoise(model, x_2, s_mid))
            x = x + d_2 * (sn - s_hat)
        _report(callback, i, x, s, denoised, s_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                           s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 down to sigma_down, then fresh noise up to the next sigma."""
    sig = _sigma_list(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        down, up = get_ancestral_step(s, sn, eta)
        if down == 0:
            x = denoised
        else:
            d = to_d(x, s, denoised)
            s_mid = math.sqrt(s * down)
            x_2 = x + d * (s_mid - s)
            d_2 = to_d(x_2, s_mid, _denoise(model, x_2, s_mid))
            x = x + d_2 * (down - s)
        if sn > 0 and up > 0:
            x = x + _noise(noise_sampler, x, s, sn) * (s_noise * up)
        _report(callback, i, x, s, denoised)
    return x


_GAUSS_LEGENDRE_3 = ((-math.sqrt(3 / 5), 5 / 9), (0.0, 8 / 9), (math.sqrt(3 / 5), 5 / 9))


def _lms_coeff(nodes: Sequence[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial l_j through ``nodes`` (degree <= 3, so
    3-point Gauss-Legendre quadrature is exact)."""
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    total = 0.0
    for xg, w in _GAUSS_LEGENDRE_3:
        tau = mid + half * xg
        prod = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                prod *= (tau - node) / (nodes[j] - node)
        total += w * prod
    return half * total


@torch.no_grad()
def sample_lms(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
               s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, order=4):
    """Linear multistep (Adams-Bashforth in sigma with exact coefficients for uneven steps), order 4."""
    sig = _sigma_list(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        ds.append(to_d(x, s, denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        while cur > 1 and len(set(sig[i - k] for k in range(cur))) < cur:  # repeated sigmas: lower the order
            cur -= 1
        nodes = [sig[i - k] for k in range(cur)]
        update = None
        for j in range(cur):
            term = ds[-1 - j] * _lms_coeff(nodes, j, s, sn)
            update = term if update is None else update + term
        x = x + update
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                              s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver++(2S) single-step second order to sigma_down, then ancestral noise."""
    sig = _sigma_list(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        down, up = get_ancestral_step(s, sn, eta)
        if down == 0:
            x = denoised
        else:
            s_mid = math.sqrt(s * down)  # half-way in lambda = -log(sigma)
            x_2 = _lerp_to(denoised, x, s_mid / s)
            denoised_2 = _denoise(model, x_2, s_mid)
            x = _lerp_to(denoised_2, x, down / s)
        if sn > 0 and up > 0:
            x = x + _noise(noise_sampler, x, s, sn) * (s_noise * up)
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                     s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, two stages per step: to the lambda-midpoint, then to the next sigma)."""
    sig = _sigma_list(sigmas)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        if sn == 0:
            x = denoised
        else:
            h = math.log(s / sn)
            s_mid = s * math.exp(-r * h)
            down, up = get_ancestral_step(s, s_mid, eta)
            x_2 = _lerp_to(denoised, x, down / s)
            z_1 = None
            if up > 0:
                z_1 = _noise(noise_sampler, x, s, s_mid)
                x_2 = x_2 + z_1 * (s_noise * up)
            denoised_2 = _denoise(model, x_2, s_mid)
            down, up = get_ancestral_step(s, sn, eta)
            denoised_d = denoised_2 if fac == 1 else (1 - fac) * denoised + fac * denoised_2
            x = _lerp_to(denoised_d, x, down / s)
            if up > 0:
                # The noise over [sn, s] contains the noise already used over [s_mid, s], as increments of
                # one Brownian path in sigma (what k-diffusion's Brownian tree gives): draw only the rest.
                z_rest = _noise(noise_sampler, x, s_mid, sn)
                if z_1 is not None:
                    frac = (s - s_mid) / (s - sn)
                    z_rest = z_1 * math.sqrt(frac) + z_rest * math.sqrt(1 - frac)
                x = x + z_rest * (s_noise * up)
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                    s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver++(2M): second-order multistep in lambda = -log(sigma), one model call per step."""
    sig = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        if sn == 0:
            x = denoised
            h = None
        else:
            h = math.log(s / sn)
            if old_denoised is None or not h_last or not h:
                x = _lerp_to(denoised, x, sn / s)
            else:
                half_inv_r = h / (2 * h_last)
                denoised_d = denoised * (1 + half_inv_r) - old_denoised * half_inv_r
                x = _lerp_to(denoised_d, x, sn / s)
        old_denoised, h_last = denoised, h
        _report(callback, i, x, s, denoised)
    return x


def _dpmpp_2m_sde(model, x, sigmas, noise_sampler, callback, eta, s_noise, solver_type):
    sig = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        if sn == 0:
            x = denoised
        else:
            h = math.log(s / sn)
            eta_h = eta * h
            he = h + eta_h
            x = _lerp_to(denoised, x, math.exp(-he))
            if old_denoised is not None and h_last and he:
                inv_r = h / h_last
                phi = -math.expm1(-he)
                coef = (phi / -he + 1) * inv_r if solver_type == "heun" else 0.5 * phi * inv_r
                x = x + (denoised - old_denoised) * coef
            if eta:
                scale = sn * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                if scale > 0:
                    x = x + _noise(noise_sampler, x, s, sn) * scale
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                        s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant."""
    return _dpmpp_2m_sde(model, x, sigmas, noise_sampler, callback, eta, s_noise, "midpoint")


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                             s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver++(2M) SDE, Heun variant."""
    return _dpmpp_2m_sde(model, x, sigmas, noise_sampler, callback, eta, s_noise, "heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                        s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep with SDE noise."""
    sig = _sigma_list(sigmas)
    d_1 = d_2 = None  # previous two x0 predictions
    h_1 = h_2 = None  # previous two step sizes in lambda
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        h = None
        if sn == 0:
            x = denoised
        else:
            h = math.log(s / sn)
            h_eta = h * (eta + 1)
            x = _lerp_to(denoised, x, math.exp(-h_eta))
            if h_eta:
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                if d_2 is not None and h_1 and h_2:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0 = (denoised - d_1) / r0
                    d1_1 = (d_1 - d_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_3 = phi_2 / h_eta - 0.5
                    x = x + d1 * phi_2 - d2 * phi_3
                elif d_1 is not None and h_1:
                    x = x + (denoised - d_1) * (phi_2 * h / h_1)
            if eta:
                scale = sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                if scale > 0:
                    x = x + _noise(noise_sampler, x, s, sn) * scale
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        _report(callback, i, x, s, denoised)
    return x


def sample_ddim(model, x, sigmas, *, eta=0.0, **kwargs):
    """DDIM in sigma space: the Euler-ancestral update. With eta=0 it is exactly Euler on these sigmas;
    DDIM's stochastic term sigma_t(eta) rescaled to sigma space equals the ancestral sigma_up, so eta>0
    adds that noise. Only the default differs: eta=0, DDIM's usual setting (the pipeline passes A1111's
    "eta_ddim")."""
    return sample_euler_ancestral(model, x, sigmas, eta=eta, **kwargs)


@torch.no_grad()
def sample_plms(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Pseudo linear multistep (PNDM/CompVis PLMS) on the eps prediction, in sigma space: the first step is
    a pseudo improved-Euler step (two model calls), the next two use 2nd/3rd-order Adams-Bashforth
    weights, then 4th order; each combined eps is applied with the DDIM (= Euler) transfer."""
    sig = _sigma_list(sigmas)
    old_eps: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        eps = to_d(x, s, denoised)
        if not old_eps:
            if sn == 0:
                eps_prime = eps
            else:
                x_next = _lerp_to(denoised, x, sn / s)  # == x + eps * (sn - s), with less rounding
                eps_prime = (eps + to_d(x_next, sn, _denoise(model, x_next, sn))) * 0.5
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * (sn - s)
        old_eps.append(eps)
        if len(old_eps) > 3:
            old_eps.pop(0)
        _report(callback, i, x, s, denoised)
    return x


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a tiny linear system (Gaussian elimination with partial pivoting, float64)."""
    n = len(rhs)
    a = [list(row[:n]) + [rhs[k]] for k, row in enumerate(matrix[:n])]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv] = a[piv], a[col]
        if a[col][col] == 0:
            raise ZeroDivisionError("singular UniPC system")
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


@torch.no_grad()
def sample_unipc(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, order=3, lower_order_final=True):
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2") variant, data-prediction form, in sigma space
    (lambda = -log sigma). Each step: evaluate the model at the predicted point, apply the UniC
    corrector to that point (reusing the same evaluation), then the UniP predictor of order
    min(order, history, steps left) (without ``lower_order_final``: min(order, history)). A step into
    sigma 0 returns the x0 prediction."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    lams: list[float] = []
    ds: list[torch.Tensor] = []
    pending = None  # corrector data from the last predictor: (x_base, B_h, D1s, rhos_c, D0)
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        if pending is not None and sn != 0:
            x_base, b_h, d1s, rhos_c, d0 = pending
            corr = (denoised - d0) * rhos_c[-1]
            for rho, d1 in zip(rhos_c[:-1], d1s):
                corr = corr + d1 * rho
            x = x_base - corr * b_h
        pending = None
        lams.append(-math.log(s))
        ds.append(denoised)
        if len(ds) > order:
            lams.pop(0)
            ds.pop(0)
        if sn == 0:
            x = denoised
        else:
            lam_t = -math.log(sn)
            lam_0, d0 = lams[-1], ds[-1]
            h = lam_t - lam_0
            k = min(order, len(ds), n - i if lower_order_final else order)
            if h == 0:
                k = 1
            rks = [(lams[-1 - m] - lam_0) / h for m in range(1, k)]
            if len(set(rks)) < len(rks) or 0.0 in rks:  # repeated sigmas: fall back to first order
                k, rks = 1, []
            d1s = [(ds[-1 - m] - d0) / rks[m - 1] for m in range(1, k)]
            rks.append(1.0)
            hh = -h
            h_phi_1 = math.expm1(hh)
            b_h = h_phi_1
            x_base = _lerp_to(d0, x, math.exp(hh))  # == (sigma_t / sigma_0) * x - h_phi_1 * D0
            if h == 0:
                x = x_base
            else:
                h_phi_k = h_phi_1 / hh - 1
                fact = 1
                rows, b = [], []
                for p in range(1, k + 1):
                    rows.append([rk ** (p - 1) for rk in rks])
                    b.append(h_phi_k * fact / b_h)
                    fact *= p + 1
                    h_phi_k = h_phi_k / hh - 1 / fact
                if k == 1:
                    x = x_base
                else:
                    rhos_p = [0.5] if k == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
                    pred = d1s[0] * rhos_p[0]
                    for rho, d1 in zip(rhos_p[1:], d1s[1:]):
                        pred = pred + d1 * rho
                    x = x_base - pred * b_h
                rhos_c = [0.5] if k == 1 else _solve(rows, b)
                pending = (x_base, b_h, d1s, rhos_c, d0)
        _report(callback, i, x, s, denoised)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
               s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Latent Consistency Model sampling: jump to the x0 prediction, re-noise to the next sigma."""
    sig = _sigma_list(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s)
        x = denoised
        if sn > 0:
            x = x + _noise(noise_sampler, x, s, sn) * sn
        _report(callback, i, x, s, denoised)
    return x


def _restart_plan(sig: list[float]) -> list[tuple[float, float]]:
    """A1111's Restart schedule: for 20+ steps, a Karras main pass over fewer steps plus restart segments
    that jump from sigma ~0.1 back up to ~2 and descend again; the total step count is unchanged."""
    n = len(sig) - 1
    plain = list(zip(sig[:-1], sig[1:]))
    if n < 20 or sig[-1] != 0 or sig[-2] <= 0:
        return plain
    r_steps, r_times = (9, 1) if n < 36 else (n // 4, 2)
    main = sigmas_karras(n - r_steps * r_times, sig[-2], sig[0]).tolist()
    min_idx = min(range(len(main)), key=lambda k: abs(main[k] - 0.1))
    max_idx = min(range(len(main)), key=lambda k: abs(main[k] - 2.0))
    if not (max_idx < min_idx and main[min_idx] > 0):
        return plain
    restart = sigmas_karras(r_steps + 1, main[min_idx], main[max_idx]).tolist()[:-1]
    plan = []
    for k in range(len(main) - 1):
        plan.append((main[k], main[k + 1]))
        if k + 1 == min_idx:
            for _ in range(r_times):
                plan.extend(zip(restart[:-1], restart[1:]))
    return plan


def dpm_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's plan: mostly third-order steps, so that the orders add up to `nfe` model calls."""
    m = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (m - 2) + [2, 1]
    return [3] * (m - 1) + [nfe % 3]


def _dpm_solver_step(eps_at, x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor, order: int) -> torch.Tensor:
    """One DPM-Solver step (Lu et al., 2022) of order 1-3 in t = -log(sigma), from the eps at t; the intermediate
    points (r = 1/2, or 1/3 and 2/3) cost order - 1 more model calls through `eps_at(x, t)`."""
    def sig(tt: float) -> float:
        return math.exp(-tt)

    h = t_next - t
    first = x - sig(t_next) * math.expm1(h) * eps
    if order == 1:
        return first
    if order == 2:
        s1 = t + 0.5 * h
        eps1 = eps_at(x - sig(s1) * math.expm1(0.5 * h) * eps, s1)
        return first - sig(t_next) * math.expm1(h) * (eps1 - eps)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1, s2 = t + r1 * h, t + r2 * h
    eps1 = eps_at(x - sig(s1) * math.expm1(r1 * h) * eps, s1)
    u2 = (x - sig(s2) * math.expm1(r2 * h) * eps
          - sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps1 - eps))
    eps2 = eps_at(u2, s2)
    return first - sig(t_next) / r2 * (math.expm1(h) / h - 1) * (eps2 - eps)


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                    s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """A1111's "DPM fast": DPM-Solver-fast with as many model calls as steps, on its own grid, uniform in
    log-sigma from the schedule's first sigma to its smallest non-zero one. When the schedule ends at 0, the
    last model call is a first-order step from there to 0 (the denoised prediction), so the result is
    clean like every other sampler's (k-diffusion stops at the smallest sigma). eta > 0 adds ancestral
    noise after each solver step. The callback reports every model call, so progress counts steps."""
    sig = _sigma_list(sigmas)
    nfe = len(sig) - 1
    positive = [s for s in sig if s > 0]
    sigma_max, sigma_min = positive[0], positive[-1]
    to_zero = sig[-1] <= 0
    calls = [0]

    def denoise(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        denoised = _denoise(model, x_in, sigma)
        _report(callback, calls[0], x_in, sigma, denoised)
        calls[0] += 1
        return denoised

    def eps_at(x_in: torch.Tensor, t: float) -> torch.Tensor:
        sigma = math.exp(-t)
        return (x_in - denoise(x_in, sigma)) / sigma

    solver_calls = nfe - 1 if to_zero else nfe
    if solver_calls > 0 and sigma_min < sigma_max:
        t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
        orders = dpm_fast_orders(solver_calls)
        grid = [t_start + (t_end - t_start) * i / len(orders) for i in range(len(orders) + 1)]
        for i, order in enumerate(orders):
            t, t_next = grid[i], grid[i + 1]
            target, s_up = t_next, 0.0
            if eta:
                s_down, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
                target = min(t_end, -math.log(s_down)) if s_down > 0 else t_end
                s_up = math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * target), 0.0))
            x = _dpm_solver_step(eps_at, x, t, target, eps_at(x, t), order)
            if s_up > 0:
                x = x + _noise(noise_sampler, x, math.exp(-t), math.exp(-t_next)) * s_noise * s_up
        start = sigma_min
    else:  # nothing left for the solver (one step, or a single non-zero sigma): first-order from the top
        start = sigma_max
    while calls[0] < nfe:  # the remaining call(s): first-order steps down to the schedule's end
        x = _lerp_to(denoise(x, start), x, sig[-1] / start)
        start = sig[-1] if sig[-1] > 0 else start
    return x


class StepSizeController:
    """Integral step-size control (the PID controller of Ilie, Jackson and Enright with only the integral
    term, as k-diffusion's DPM adaptive uses by default): the next step is h * (1/error)^(1/order), softened
    by 1 + atan(f - 1); a step is accepted when that factor is at least `accept_safety`."""

    def __init__(self, h: float, order: float, accept_safety: float = 0.81, eps: float = 1e-8):
        self.h, self.order, self.accept_safety, self.eps = h, order, accept_safety, eps

    def propose(self, error: float) -> bool:
        factor = (1.0 / (error + self.eps)) ** (1.0 / self.order)
        factor = 1.0 + math.atan(factor - 1.0)
        self.h *= factor
        return factor >= self.accept_safety


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                        s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, rtol=0.05, atol=0.0078, h_init=0.05,
                        accept_safety=0.81):
    """A1111's "DPM adaptive": DPM-Solver-3 with an embedded second-order solution for the error estimate
    and adaptive steps in t = -log(sigma), from the schedule's first sigma to its smallest non-zero one
    (the step count is not used; the error tolerances decide). When the schedule ends at 0, one last model
    call gives the denoised prediction. eta > 0 adds ancestral noise after each accepted step. Progress is
    reported as the share of the log-sigma range covered, spread over the schedule's steps."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    positive = [s for s in sig if s > 0]
    sigma_max, sigma_min = positive[0], positive[-1]
    reported = [0]

    def report_until(i: int, x_now: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
        while reported[0] <= min(i, n - 1):
            _report(callback, reported[0], x_now, sigma, denoised)
            reported[0] += 1

    if sigma_min < sigma_max:
        t, t_end = -math.log(sigma_max), -math.log(sigma_min)
        span = t_end - t
        t_start = t
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        control = StepSizeController(h_init, 1.5 if eta else 3.0, accept_safety)
        x_prev = x
        denoised = x
        while t < t_end - 1e-5:
            t_next = min(t_end, t + control.h)
            target, s_up = t_next, 0.0
            if eta:
                s_down, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
                target = min(t_end, -math.log(s_down)) if s_down > 0 else t_end
                s_up = math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * target), 0.0))
            sigma_t, h = math.exp(-t), target - t
            denoised = _denoise(model, x, sigma_t)
            eps = (x - denoised) / sigma_t
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
            eps1 = (u1 - _denoise(model, u1, math.exp(-s1))) / math.exp(-s1)
            u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
                  - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps1 - eps))
            eps2 = (u2 - _denoise(model, u2, math.exp(-s2))) / math.exp(-s2)
            sigma_to = math.exp(-target)
            first = x - sigma_to * math.expm1(h) * eps
            x_low = first - sigma_to / (2 * r1) * math.expm1(h) * (eps1 - eps)  # DPM-Solver-2 with r = 1/3
            x_high = first - sigma_to / r2 * (math.expm1(h) / h - 1) * (eps2 - eps)  # DPM-Solver-3
            scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
            error = float(torch.linalg.norm((x_low - x_high) / scale)) / math.sqrt(x.numel())
            if control.propose(error):
                x_prev = x_low
                x = x_high
                if s_up > 0:
                    x = x + _noise(noise_sampler, x, sigma_t, math.exp(-t_next)) * s_noise * s_up
                t = t_next
                # progress: the covered share of the range, over the first n - 1 steps (the last is the end)
                report_until(int((t - t_start) / span * (n - 1)) - 1, x, math.exp(-t), denoised)
        report_until(n - 2, x, sigma_min, denoised)
    if sig[-1] <= 0 or sigma_min >= sigma_max:  # the end: the denoised prediction (or one step down from the top)
        start = sigma_min
        denoised = _denoise(model, x, start)
        x = _lerp_to(denoised, x, sig[-1] / start)
    else:
        denoised = x
    report_until(n - 1, x, sig[-1], denoised)
    return x


@torch.no_grad()
def sample_restart(model, x, sigmas, *, noise_sampler=None, callback=None, eta=1.0, s_churn=0.0,
                   s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Restart sampling (Xu et al. 2023) with Heun steps, A1111's automatic restart list. Below 20 steps
    it is plain Heun on the given sigmas; from 20 steps it uses its own Karras sigmas between the given
    extremes, as A1111 does. It calls the callback once per step, len(sigmas) - 1 times."""
    sig = _sigma_list(sigmas)
    last = None
    for i, (old, new) in enumerate(_restart_plan(sig)):
        if last is not None and old > last:
            x = x + _noise(noise_sampler, x, last, old) * (s_noise * math.sqrt(old ** 2 - last ** 2))
        denoised = _denoise(model, x, old)
        if new == 0:
            x = denoised
        else:
            d = to_d(x, old, denoised)
            x_2 = x + d * (new - old)
            d_2 = to_d(x_2, new, _denoise(model, x_2, new))
            x = x + (d + d_2) * (0.5 * (new - old))
        last = new
        _report(callback, i, x, old, denoised)
    return x


# Sampler name (as in ``backend.core.sampler_catalog.SAMPLERS``) -> its sample function.
SAMPLE_FUNCTIONS: Mapping[str, Callable[..., torch.Tensor]] = MappingProxyType({
    "DPM++ 2M": sample_dpmpp_2m,
    "DPM++ SDE": sample_dpmpp_sde,
    "DPM++ 2M SDE": sample_dpmpp_2m_sde,
    "DPM++ 2M SDE Heun": sample_dpmpp_2m_sde_heun,
    "DPM++ 2S a": sample_dpmpp_2s_ancestral,
    "DPM++ 3M SDE": sample_dpmpp_3m_sde,
    "Euler a": sample_euler_ancestral,
    "Euler": sample_euler,
    "LMS": sample_lms,
    "Heun": sample_heun,
    "DPM2": sample_dpm_2,
    "DPM2 a": sample_dpm_2_ancestral,
    "DPM fast": sample_dpm_fast,
    "DPM adaptive": sample_dpm_adaptive,
    "Restart": sample_restart,
    "DDIM": sample_ddim,
    "PLMS": sample_plms,
    "UniPC": sample_unipc,
    "LCM": sample_lcm,
})
