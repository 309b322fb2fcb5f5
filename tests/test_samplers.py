"""Samplers and schedules against denoisers whose exact answer is known.

* A point-mass data distribution (all data equals x0): the ideal denoiser returns x0 whatever the input,
  so every sampler, deterministic or not, must end exactly at x0.
* A Gaussian data distribution N(mu, s^2): the ideal denoiser is (s^2 x + sigma^2 mu) / (s^2 + sigma^2) and
  the probability-flow ODE maps the prior exactly onto N(mu, s^2), so deterministic samplers must turn
  prior noise into samples with mean mu and std s, and stochastic ones must too as steps grow.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from backend.core import sampler_catalog as C
from backend.engine import samplers as S
from backend.engine import schedules as SS
from backend.core.errors import UserError

MS = SS.DiscreteSchedule.from_betas()
MU, SD = 0.5, 0.3
STEP_COUNTS = (1, 2, 5, 20)
A1111_SAMPLER_NAMES = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                       "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "PLMS", "UniPC",
                       "LCM"]
A1111_SCHEDULES = [("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"),
                   ("exponential", "Exponential"), ("polyexponential", "Polyexponential"),
                   ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"), ("simple", "Simple"),
                   ("normal", "Normal"), ("ddim", "DDIM"), ("beta", "Beta"), ("align_your_steps", "Align Your Steps")]


class PointMass:
    """Ideal denoiser for data that is always x0; counts calls and checks the sigma batch shape."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)
        assert torch.isfinite(x).all()
        self.calls += 1
        return self.x0.expand_as(x).clone()


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
    return (SD ** 2 * x + s2 * MU) / (SD ** 2 + s2)


def seeded_noise(like: torch.Tensor, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(like.shape, generator=gen, dtype=like.dtype)


def exact_ode_map(x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """Where the probability-flow ODE takes x_start (at sigma_start) at sigma 0, for N(MU, SD^2) data."""
    return MU + (x_start - MU) * SD / math.sqrt(SD ** 2 + sigma_start ** 2)


def deterministic(info: C.SamplerInfo) -> bool:
    return not info.uses_noise or info.name == "DDIM"  # DDIM draws nothing at its default eta=0


# --- DiscreteSchedule ------------------------------------------------------------------------------------

def test_discrete_schedule_matches_sd_training_schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    assert MS.sigmas.shape == (1000,) and MS.sigmas.dtype == torch.float32
    assert torch.allclose(MS.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-6)
    assert (MS.sigmas[1:] > MS.sigmas[:-1]).all()
    assert MS.sigma_min == pytest.approx(0.0291672, rel=1e-4)
    assert MS.sigma_max == pytest.approx(14.614642, rel=1e-5)
    linear = SS.DiscreteSchedule.from_betas(0.0001, 0.02, 1000, schedule="linear")
    assert linear.sigma_max > MS.sigma_max
    with pytest.raises(ValueError):
        SS.DiscreteSchedule.from_betas(schedule="cosine-ish")


def test_sigma_t_round_trip_and_interpolation():
    t = torch.rand(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    t = torch.cat([t, torch.tensor([0.0, 1.0, 500.0, 998.5, 999.0], dtype=torch.float64)])
    assert torch.allclose(MS.sigma_to_t(MS.t_to_sigma(t)), t, atol=1e-9)
    t32 = t.float()
    assert torch.allclose(MS.sigma_to_t(MS.t_to_sigma(t32)), t32, atol=2e-3)
    # integer timesteps hit the table exactly; halfway is the geometric mean (log-sigma interpolation)
    assert torch.allclose(MS.t_to_sigma(torch.arange(1000.0)), MS.sigmas, rtol=1e-5)
    mid = float(MS.t_to_sigma(torch.tensor(10.5, dtype=torch.float64)))
    assert mid == pytest.approx(math.sqrt(float(MS.sigmas[10]) * float(MS.sigmas[11])), rel=1e-6)
    # shapes are kept, out-of-range values clamp, sigma 0 is timestep 0
    grid = MS.t_to_sigma(torch.tensor([[0.0, 999.0], [250.25, 750.75]]))
    assert grid.shape == (2, 2)
    assert MS.sigma_to_t(grid).shape == (2, 2)
    assert float(MS.sigma_to_t(torch.tensor(0.0))) == 0.0
    assert float(MS.sigma_to_t(torch.tensor(1000.0))) == pytest.approx(999.0)
    assert MS.sigma_to_t(torch.tensor([1.0], dtype=torch.float16)).dtype == torch.float32


# --- schedules -------------------------------------------------------------------------------------------

def test_scheduler_table_names_and_labels():
    assert [(s.name, s.label) for s in C.SCHEDULERS] == A1111_SCHEDULES
    for name, label in A1111_SCHEDULES:
        assert C.find_scheduler(name) is C.find_scheduler(label) is C.find_scheduler(label.upper())
    with pytest.raises(UserError, match="Karras"):
        C.find_scheduler("Wobbly")


@pytest.mark.parametrize("schedule", [name for name, _ in A1111_SCHEDULES])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 20, 150])
def test_get_sigmas_shape_and_monotonic(schedule, steps):
    for sampler in (None, "Euler", "DPM++ 2M", "DDIM", "DPM2"):
        sig = SS.get_sigmas(schedule, steps, MS, sampler)
        assert sig.dtype == torch.float32 and sig.shape == (steps + 1,)
        assert sig[-1] == 0
        assert (sig[:-1] > 0).all()
        assert (sig[1:] < sig[:-1]).all(), sig
        assert float(sig[0]) <= MS.sigma_max * (1 + 1e-6)
        assert float(sig[-2]) >= MS.sigma_min * (1 - 1e-6)


def test_get_sigmas_accepts_labels_case_insensitive_and_rejects_bad_input():
    assert torch.equal(SS.get_sigmas("Karras", 10, MS, "Euler"), SS.get_sigmas("karras", 10, MS, "euler"))
    assert torch.equal(SS.get_sigmas("SGM UNIFORM", 10, MS), SS.get_sigmas("sgm_uniform", 10, MS))
    with pytest.raises(UserError):
        SS.get_sigmas("nonsense", 10, MS, "Euler")
    with pytest.raises(UserError):
        SS.get_sigmas("karras", 0, MS, "Euler")


def test_schedule_formulas():
    n, lo, hi = 10, MS.sigma_min, MS.sigma_max
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert torch.allclose(SS.get_sigmas("karras", n, MS)[:-1].double(), karras, rtol=1e-6)
    expo = SS.get_sigmas("exponential", n, MS)[:-1].double().log()
    assert torch.allclose(expo.diff(), expo.diff()[:1].expand(n - 1), atol=1e-5)
    assert torch.allclose(SS.get_sigmas("polyexponential", n, MS), SS.get_sigmas("exponential", n, MS))
    uniform = MS.t_to_sigma(torch.linspace(999, 0, n, dtype=torch.float64))
    assert torch.allclose(SS.get_sigmas("uniform", n, MS)[:-1].double(), uniform, rtol=1e-6)
    assert torch.allclose(SS.get_sigmas("normal", n, MS), SS.get_sigmas("uniform", n, MS))
    sgm = MS.t_to_sigma(torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1])
    assert torch.allclose(SS.get_sigmas("sgm_uniform", n, MS)[:-1].double(), sgm, rtol=1e-6)
    kl = SS.get_sigmas("kl_optimal", n, MS)[:-1].double().atan()
    assert torch.allclose(kl.diff(), kl.diff()[:1].expand(n - 1), atol=1e-6)
    # DDIM: CompVis timesteps 1, 51, ..., 951 for 20 steps, highest first
    ddim = SS.get_sigmas("ddim", 20, MS)
    assert torch.allclose(ddim[:-1], MS.sigmas[torch.arange(1, 1000, 50)].flip(0))
    # Simple: every (1000 / n)-th table entry from the top
    simple = SS.get_sigmas("simple", 4, MS)
    assert torch.allclose(simple[:-1], MS.sigmas[[999, 749, 499, 249]])
    # Beta: both ends of the range are included, steps are dense at both ends
    beta = SS.get_sigmas("beta", 10, MS).double()
    assert float(beta[0]) == pytest.approx(hi, rel=1e-6) and float(beta[-2]) == pytest.approx(lo, rel=1e-6)
    t = MS.sigma_to_t(beta[:-1])
    gaps = -t.diff()
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]


def test_beta_quantile():
    # Beta(1/2, 1/2) is the arcsine distribution: ppf(q) = sin^2(pi q / 2)
    for q in (0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert SS.beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-12)
    # Beta(2, 1) has cdf x^2
    assert SS.beta_ppf(0.25, 2.0, 1.0) == pytest.approx(0.5, abs=1e-12)
    for q in torch.linspace(0.001, 0.999, 50).tolist():
        assert SS._betainc(SS.beta_ppf(q, 0.6, 0.6), 0.6, 0.6) == pytest.approx(q, abs=1e-12)


def test_automatic_picks_the_samplers_default_schedule():
    for sampler, schedule in (("DPM++ 2M", "karras"), ("DPM++ 2M SDE", "exponential"), ("Euler", "uniform"),
                              ("DDIM", "ddim"), ("UniPC", "uniform"), ("DPM++ SDE", "karras")):
        assert torch.equal(SS.get_sigmas("Automatic", 12, MS, sampler), SS.get_sigmas(schedule, 12, MS, sampler))
    assert torch.equal(SS.get_sigmas(None, 12, MS, None), SS.get_sigmas("uniform", 12, MS))


@pytest.mark.parametrize("sampler", ["DPM2", "DPM2 a", "DPM++ 3M SDE", "k_dpm_2"])
def test_discard_next_to_last_sigma(sampler):
    info = C.find_sampler(sampler)
    assert info.discard_next_to_last_sigma
    for steps in (1, 2, 10):
        full = SS.get_sigmas("karras", steps + 1, MS)
        got = SS.get_sigmas("karras", steps, MS, sampler)
        assert got.shape == (steps + 1,)
        assert torch.equal(got, torch.cat([full[:-2], full[-1:]]))
    assert not C.find_sampler("Euler").discard_next_to_last_sigma
    assert torch.equal(SS.get_sigmas("karras", 10, MS, "Euler"), SS.get_sigmas("karras", 10, MS))


# --- the sampler table -----------------------------------------------------------------------------------

def test_sampler_table():
    assert [s.name for s in C.SAMPLERS] == A1111_SAMPLER_NAMES
    expected_aliases = {"Euler a": "k_euler_a", "Euler": "k_euler", "LMS": "k_lms", "Heun": "k_heun",
                        "DPM2": "k_dpm_2", "DPM2 a": "k_dpm_2_a", "DPM++ 2S a": "k_dpmpp_2s_a",
                        "DPM++ 2M": "k_dpmpp_2m", "DPM++ SDE": "k_dpmpp_sde", "DPM++ 2M SDE": "k_dpmpp_2m_sde",
                        "DDIM": "ddim", "PLMS": "plms", "UniPC": "unipc", "LCM": "k_lcm"}
    for name, alias in expected_aliases.items():
        assert alias in C.find_sampler(name).aliases
    defaults = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
                "DPM2": "karras", "DPM2 a": "karras", "DDIM": "ddim", "Euler a": "uniform", "Euler": "uniform"}
    for name, sched in defaults.items():
        assert C.find_sampler(name).default_scheduler == sched
    second = {s.name for s in C.SAMPLERS if s.second_order}
    assert second == {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"}
    noisy = {s.name for s in C.SAMPLERS if s.uses_noise}
    assert {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "LCM"} <= noisy
    assert not noisy & {"Euler", "Heun", "LMS", "DPM2", "DPM++ 2M", "PLMS", "UniPC"}
    assert C.find_sampler("DPM++ 2M").options["scheduler"] == "karras"
    for info in C.SAMPLERS:
        assert pickle.loads(pickle.dumps(info)) is info
        dict(info.options)  # what /sdapi/v1/samplers serves


def test_find_sampler_names_aliases_and_combined_names():
    assert C.find_sampler("Euler a").name == "Euler a"
    assert C.find_sampler("euler A").name == "Euler a"
    assert C.find_sampler("k_euler_ancestral").name == "Euler a"
    assert C.find_sampler("K_DPMPP_2M").name == "DPM++ 2M"
    assert C.find_sampler("  DPM++   2M ").name == "DPM++ 2M"
    assert C.find_sampler("DPM++ 2M Karras").name == "DPM++ 2M"
    assert C.find_sampler("DPM++ 2M SDE Heun Exponential").name == "DPM++ 2M SDE Heun"
    assert C.split_sampler_and_schedule("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert C.split_sampler_and_schedule("dpm++ sde karras") == ("dpm++ sde", "Karras")
    assert C.split_sampler_and_schedule("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert C.split_sampler_and_schedule("DPM++ 2M SDE Heun") == ("DPM++ 2M SDE Heun", None)
    assert C.split_sampler_and_schedule("DPM2 a Karras") == ("DPM2 a", "Karras")
    assert C.split_sampler_and_schedule("Euler a SGM Uniform") == ("Euler a", "SGM Uniform")
    assert C.split_sampler_and_schedule("DDIM") == ("DDIM", None)
    assert C.split_sampler_and_schedule("Euler") == ("Euler", None)
    assert C.split_sampler_and_schedule("Nope Karras") == ("Nope Karras", None)


@pytest.mark.parametrize("bad", ["Euler b", "DPM++ 9M", "", "Karras"])
def test_unknown_sampler_raises_user_error_naming_valid_ones(bad):
    with pytest.raises(UserError) as err:
        C.find_sampler(bad)
    assert "DPM++ 2M" in str(err.value) and "Euler a" in str(err.value)


def test_ancestral_step():
    down, up = S.get_ancestral_step(2.0, 1.0, 1.0)
    assert down ** 2 + up ** 2 == pytest.approx(1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4 - 1) / 4))
    assert S.get_ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    assert S.get_ancestral_step(2.0, 0.0, 1.0) == (0.0, 0.0)
    down, up = S.get_ancestral_step(2.0, 1.0, 5.0)  # capped at sigma_to
    assert up == 1.0 and down == 0.0


# --- running every sampler -------------------------------------------------------------------------------

@pytest.mark.parametrize("info", C.SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_every_schedule_lands_on_the_point_mass(info):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 4, generator=gen)
    for schedule, _ in A1111_SCHEDULES:
        for steps in STEP_COUNTS:
            sigmas = SS.get_sigmas(schedule, steps, MS, info.name)
            model = PointMass(x0)
            seen = []
            x = torch.randn(x0.shape, generator=gen) * sigmas[0]
            out = info.sample_fn(model, x, sigmas, noise_sampler=seeded_noise(x), callback=seen.append)
            assert out.shape == x.shape and out.dtype == torch.float32
            assert torch.isfinite(out).all(), (schedule, steps)
            assert torch.allclose(out, x0, atol=1e-4), (schedule, steps, (out - x0).abs().max())
            n = len(sigmas) - 1
            assert [d["i"] for d in seen] == list(range(n))
            assert all(set(d) >= {"i", "x", "sigma", "denoised"} for d in seen)
            if info.second_order:
                assert model.calls == 2 * n - 1, (schedule, steps, model.calls)
            elif info.name == "PLMS":
                assert model.calls == (n + 1 if n > 1 else n)
            elif info.name == "DPM adaptive":  # the error tolerances, not the step count, decide its calls
                assert model.calls >= 1
            else:
                assert model.calls == n


def test_sigmas_not_ending_in_zero_and_partial_schedules():
    """img2img runs the tail of a schedule; a schedule may also stop above zero."""
    x0 = torch.full((1, 2, 2, 2), 0.25)
    sigmas = SS.get_sigmas("karras", 20, MS)
    for info in C.SAMPLERS:
        for part in (sigmas[12:], sigmas[:-1], sigmas[-2:]):
            x = x0 + 0.7 * float(part[0])
            out = info.sample_fn(PointMass(x0), x, part, noise_sampler=seeded_noise(x), callback=None)
            assert torch.isfinite(out).all()
            if float(part[-1]) == 0:
                assert torch.allclose(out, x0, atol=1e-5)
            elif deterministic(info) and info.name != "LCM":
                # the ODE keeps x - x0 proportional to sigma
                assert torch.allclose(out, x0 + 0.7 * float(part[-1]), atol=1e-4), info.name


@pytest.mark.parametrize("info", [s for s in C.SAMPLERS if deterministic(s)], ids=lambda s: s.name)
def test_deterministic_samplers_map_the_prior_onto_the_gaussian(info):
    z = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def must_not_draw(sigma, sigma_next):
        raise AssertionError("a deterministic sampler drew noise")

    for schedule, steps, tol in (("karras", 30, 0.025), ("automatic", 40, 0.05)):
        sigmas = SS.get_sigmas(schedule, steps, MS, info.name).double()
        x = z * sigmas[0]
        out = info.sample_fn(gaussian_denoiser, x, sigmas, noise_sampler=must_not_draw, callback=None)
        exact = exact_ode_map(x, float(sigmas[0]))
        assert abs(float(out.mean()) - MU) < 0.02, (schedule, float(out.mean()))
        assert abs(float(out.std()) - SD) < tol, (schedule, float(out.std()))
        assert abs(float(out.mean()) - float(exact.mean())) < 0.005
    if info.name not in ("Euler", "DDIM"):  # higher order: close to the exact ODE solution sample by sample
        sigmas = SS.get_sigmas("karras", 30, MS, info.name).double()
        x = z * sigmas[0]
        out = info.sample_fn(gaussian_denoiser, x, sigmas, noise_sampler=must_not_draw, callback=None)
        assert float((out - exact_ode_map(x, float(sigmas[0]))).abs().max()) < 0.02


def test_higher_order_samplers_converge_at_their_order():
    """Error vs the exact ODE solution (stopping at sigma 0.05) when the step count doubles."""
    z = torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(fn, steps, **kw):
        sig = SS.sigmas_karras(steps, 0.05, MS.sigma_max)[:-1]
        x = z * sig[0]
        out = fn(gaussian_denoiser, x, sig, noise_sampler=None, callback=None, **kw)
        end, start = float(sig[-1]), float(sig[0])
        exact = MU + (x - MU) * math.sqrt(SD ** 2 + end ** 2) / math.sqrt(SD ** 2 + start ** 2)
        return float((out - exact).abs().max())

    for fn, kw, order in ((S.sample_euler, {}, 1), (S.sample_heun, {}, 2), (S.sample_dpm_2, {}, 2),
                          (S.sample_dpmpp_2m, {}, 2), (S.sample_lms, {}, 3.5),
                          (S.sample_unipc, {"order": 2, "lower_order_final": False}, 3),
                          (S.sample_unipc, {"order": 3, "lower_order_final": False}, 4)):
        ratio = error(fn, 40, **kw) / error(fn, 80, **kw)
        assert math.log2(ratio) > order - 0.3, (fn.__name__, kw, math.log2(ratio))


@pytest.mark.parametrize("info", [s for s in C.SAMPLERS if not deterministic(s) and s.name != "LCM"],
                         ids=lambda s: s.name)
def test_stochastic_samplers_sample_the_gaussian(info):
    z = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = SS.get_sigmas("karras", 60, MS, info.name).double()
    x = z * sigmas[0]
    draws = []

    def noise(sigma, sigma_next, gen=torch.Generator().manual_seed(5)):
        draws.append((sigma, sigma_next))
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)

    # DPM adaptive's accuracy is set by its tolerance, not the steps: A1111's default (rtol 0.05) takes ~13
    # large steps whose ODE error widens the ancestral samples by ~15%; a tight tolerance must get it right.
    kw = {"rtol": 0.01} if info.name == "DPM adaptive" else {}
    out = info.sample_fn(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None, **kw)
    assert draws, "a stochastic sampler drew no noise"
    assert abs(float(out.mean()) - MU) < 0.02
    assert abs(float(out.std()) - SD) < 0.03
    # same noise sampler seed -> same result
    again = info.sample_fn(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise(x, 5), callback=None, **kw)
    assert torch.equal(out, again)


def test_eta_zero_and_churn():
    z = torch.randn(8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = SS.get_sigmas("karras", 10, MS).double()
    x = z * sigmas[0]
    calls = []

    def noise(sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.zeros_like(x)

    # eta = 0 makes the ancestral/SDE samplers deterministic and DDIM(eta=0) equals Euler
    for name in ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        C.find_sampler(name).sample_fn(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None, eta=0.0)
    assert calls == []
    euler = S.sample_euler(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None)
    ddim = S.sample_ddim(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None)
    euler_a0 = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None, eta=0.0)
    assert torch.allclose(euler, ddim) and torch.allclose(euler, euler_a0)
    ddim_eta = S.sample_ddim(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise(x), callback=None, eta=1.0)
    euler_a = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise(x), callback=None)
    assert torch.allclose(ddim_eta, euler_a)
    # churn draws once per step and changes the result
    churned = S.sample_euler(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise(x), callback=None,
                             s_churn=1.0)
    assert not torch.allclose(churned, euler)
    calls.clear()
    S.sample_heun(gaussian_denoiser, x, sigmas, noise_sampler=noise, callback=None, s_churn=1.0)
    assert len(calls) == len(sigmas) - 1


def test_callback_exception_propagates_and_stops_sampling():
    class Stop(Exception):
        pass

    x0 = torch.zeros(1, 1, 2, 2)
    for info in C.SAMPLERS:
        sigmas = SS.get_sigmas("automatic", 10, MS, info.name)
        model = PointMass(x0)
        seen = []
        calls_at_stop = []

        def callback(d):
            seen.append(d["i"])
            if d["i"] == 2:
                calls_at_stop.append(model.calls)
                raise Stop()

        with pytest.raises(Stop):
            info.sample_fn(model, torch.randn(1, 1, 2, 2) * sigmas[0], sigmas, noise_sampler=None, callback=callback)
        assert seen == [0, 1, 2], info.name
        assert model.calls == calls_at_stop[0]  # nothing runs after the callback raised
        if info.name != "DPM adaptive":  # (its reports follow the log-sigma range covered, not its calls)
            assert model.calls <= 2 * 3 + 1


def test_restart_keeps_the_step_count():
    x0 = torch.full((1, 1, 2, 2), -0.5)
    for steps in (19, 20, 35, 36, 50):
        sigmas = SS.get_sigmas("automatic", steps, MS, "Restart")
        model = PointMass(x0)
        seen = []
        out = S.sample_restart(model, torch.randn(1, 1, 2, 2) * sigmas[0], sigmas, noise_sampler=None,
                               callback=seen.append)
        assert [d["i"] for d in seen] == list(range(steps))
        assert torch.allclose(out, x0, atol=1e-5)
        sig_seen = [d["sigma"] for d in seen]
        restarted = any(b > a for a, b in zip(sig_seen, sig_seen[1:]))
        assert restarted == (steps >= 20)


def test_align_your_steps_follows_the_published_levels_per_family():
    sd1 = SS.AYS_NOISE_LEVELS["sd1"]
    exact = SS.get_sigmas("Align Your Steps", 11, MS)  # as many steps as published levels: the table itself
    assert torch.allclose(exact[:-1].double(), torch.tensor(sd1, dtype=torch.float64), rtol=1e-6) and exact[-1] == 0
    for steps in (4, 10, 25):
        sig = SS.get_sigmas("AYS", steps, MS).double()
        assert sig.numel() == steps + 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
        assert sig[0] == pytest.approx(sd1[0]) and sig[-2] == pytest.approx(sd1[-1])
    # log-linear between published levels: 21 levels put the midpoints of log-sigma between the published ones
    mid = SS.sigmas_align_your_steps(21)[1].double()
    assert mid == pytest.approx(math.sqrt(sd1[0] * sd1[1]), rel=1e-6)
    xl = SS.DiscreteSchedule(MS.alphas_cumprod, family="sdxl")
    assert SS.get_sigmas("Align Your Steps", 11, xl)[1] == pytest.approx(SS.AYS_NOISE_LEVELS["sdxl"][1], rel=1e-6)


def test_dpm_fast_plan_and_solver_orders():
    for nfe in range(1, 13):
        assert sum(S.dpm_fast_orders(nfe)) == nfe
    assert S.dpm_fast_orders(9) == [3, 3, 2, 1] and S.dpm_fast_orders(10) == [3, 3, 3, 1]
    z = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def eps_at(x, t):
        s = math.exp(-t)
        return (x - gaussian_denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s

    def error(order, n, sigma_max=14.6, sigma_min=0.05):
        t0, t1 = -math.log(sigma_max), -math.log(sigma_min)
        x = z * sigma_max
        for i in range(n):
            t, t_next = t0 + (t1 - t0) * i / n, t0 + (t1 - t0) * (i + 1) / n
            x = S._dpm_solver_step(eps_at, x, t, t_next, eps_at(x, t), order)
        exact = MU + (z * sigma_max - MU) * math.sqrt(SD ** 2 + sigma_min ** 2) / math.sqrt(SD ** 2 + sigma_max ** 2)
        return float((x - exact).abs().max())

    for order in (1, 2, 3):  # each DPM-Solver step converges at its order
        assert math.log2(error(order, 10) / error(order, 20)) > order - 0.3, order


def test_dpm_adaptive_without_noise_follows_the_ode_to_its_tolerance():
    z = torch.randn(1024, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = SS.get_sigmas("karras", 20, MS).double()
    x = z * sigmas[0]
    exact = exact_ode_map(x, float(sigmas[0]))
    loose = S.sample_dpm_adaptive(gaussian_denoiser, x, sigmas, eta=0.0)
    tight = S.sample_dpm_adaptive(gaussian_denoiser, x, sigmas, eta=0.0, rtol=0.001, atol=0.0001)
    err_loose, err_tight = (float((o - exact).abs().max()) for o in (loose, tight))
    assert err_loose < 0.05 and err_tight < 0.002 and err_tight < err_loose / 5, (err_loose, err_tight)
