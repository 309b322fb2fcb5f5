"""The sampler and schedule-type names, as data: A1111's "Sampling method" and "Schedule type" lists.

Torch-free (the app process lists, checks and resolves names with it): each entry holds a name, its
aliases, its options (as A1111's ``/sdapi/v1/samplers`` serves them) and its default schedule. The
functions that compute are in the engine and are looked up by name when a job runs:
``SamplerInfo.sample_fn`` (``backend.engine.samplers.SAMPLE_FUNCTIONS``) and ``SchedulerInfo.fn``
(``backend.engine.schedules.SCHEDULE_FUNCTIONS``); only the backend process calls them.

``SCHEDULERS`` / ``SchedulerInfo`` / ``find_scheduler``
    A1111's "Schedule type" list (Automatic, Uniform, Karras, ...).
``SAMPLERS`` / ``SamplerInfo`` / ``find_sampler`` / ``split_sampler_and_schedule``
    A1111's sampler list with its names and aliases; legacy combined names such
    as "DPM++ 2M Karras" are understood.
``resolve_sampler(sampler_name, scheduler, default)``
    A request's sampler and schedule type, as (SamplerInfo, schedule label).
``resolve_sampling(req, default)`` / ``SamplingChoice``
    The same for a whole request (with hires. fix's second pass), done once by the app for each job.

The module holds constant tables only: no state is shared between calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from backend.core.errors import UserError

__all__ = ["SchedulerInfo", "SCHEDULERS", "find_scheduler", "SamplerInfo", "SAMPLERS", "find_sampler",
           "split_sampler_and_schedule", "resolve_sampler", "SamplingChoice", "resolve_sampling"]


@dataclass(frozen=True)
class SchedulerInfo:
    """One "Schedule type"; ``fn(n, model_schedule)`` (engine) returns n+1 sigmas (None for Automatic)."""
    name: str
    label: str
    default_rho: float = -1.0
    aliases: tuple[str, ...] = ()

    @property
    def fn(self) -> Callable | None:
        from backend.engine.schedules import SCHEDULE_FUNCTIONS  # the engine's (torch); only the backend process computes
        return SCHEDULE_FUNCTIONS.get(self.name)


SCHEDULERS: tuple[SchedulerInfo, ...] = (
    SchedulerInfo("automatic", "Automatic"),
    SchedulerInfo("uniform", "Uniform"),
    SchedulerInfo("karras", "Karras", default_rho=7.0),
    SchedulerInfo("exponential", "Exponential"),
    SchedulerInfo("polyexponential", "Polyexponential", default_rho=1.0),
    SchedulerInfo("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",)),
    SchedulerInfo("kl_optimal", "KL Optimal"),
    SchedulerInfo("simple", "Simple"),
    SchedulerInfo("normal", "Normal"),
    SchedulerInfo("ddim", "DDIM"),
    SchedulerInfo("beta", "Beta"),
    SchedulerInfo("align_your_steps", "Align Your Steps", aliases=("AYS",)),
)

def _norm(name: str) -> str:
    return " ".join(str(name).split()).lower()


_SCHEDULER_LOOKUP: Mapping[str, SchedulerInfo] = MappingProxyType({
    _norm(key): s for s in SCHEDULERS for key in (s.name, s.label, *s.aliases)
})


def find_scheduler(name: str) -> SchedulerInfo:
    """Schedule type by name or label, case-insensitive ("karras", "Karras", "SGM Uniform")."""
    found = _SCHEDULER_LOOKUP.get(_norm(name or "automatic"))
    if found is None:
        raise UserError(f"Unknown schedule type {name!r}. Valid schedule types: "
                        f"{', '.join(s.label for s in SCHEDULERS)}.")
    return found


@dataclass(frozen=True, eq=False)
class SamplerInfo:
    """One entry of the sampler dropdown / ``/sdapi/v1/samplers``.

    ``options`` mirrors A1111's option dict (scheduler, second_order, discard_next_to_last_sigma,
    brownian_noise, uses_ensd, solver_type). ``uses_noise`` is True when the sampler draws fresh noise
    from ``noise_sampler`` during sampling (ancestral/SDE samplers, LCM, Restart, DDIM with eta > 0);
    Euler, Heun and DPM2 draw only with ``s_churn > 0``.
    """
    name: str
    aliases: tuple[str, ...]
    default_scheduler: str = "uniform"
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    uses_noise: bool = False

    @property
    def sample_fn(self) -> Callable:
        """The sampling function (engine, torch); only the backend process calls it."""
        from backend.engine.samplers import SAMPLE_FUNCTIONS
        return SAMPLE_FUNCTIONS[self.name]

    @property
    def second_order(self) -> bool:
        """Two model calls per step (except a final step into sigma 0)."""
        return bool(self.options.get("second_order", False))

    @property
    def discard_next_to_last_sigma(self) -> bool:
        return bool(self.options.get("discard_next_to_last_sigma", False))

    def __reduce__(self):  # pickles by name, unpickles to the table's entry
        return (find_sampler, (self.name,))


def _sampler(name: str, aliases: Iterable[str], scheduler: str = "uniform", uses_noise: bool = False,
             **options) -> SamplerInfo:
    opts = dict(options)
    if scheduler != "uniform":
        opts = {"scheduler": scheduler, **opts}
    return SamplerInfo(name, tuple(aliases), scheduler, MappingProxyType(opts), uses_noise)


SAMPLERS: tuple[SamplerInfo, ...] = (
    _sampler("DPM++ 2M", ["k_dpmpp_2m"], "karras"),
    _sampler("DPM++ SDE", ["k_dpmpp_sde"], "karras", True,
             second_order=True, brownian_noise=True),
    _sampler("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], "exponential", True, brownian_noise=True),
    _sampler("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"], "exponential", True,
             brownian_noise=True, solver_type="heun"),
    _sampler("DPM++ 2S a", ["k_dpmpp_2s_a"], "karras", True,
             uses_ensd=True, second_order=True),
    _sampler("DPM++ 3M SDE", ["k_dpmpp_3m_sde"], "exponential", True,
             discard_next_to_last_sigma=True, brownian_noise=True),
    _sampler("Euler a", ["k_euler_a", "k_euler_ancestral"], "uniform", True, uses_ensd=True),
    _sampler("Euler", ["k_euler"]),
    _sampler("LMS", ["k_lms"]),
    _sampler("Heun", ["k_heun"], second_order=True),
    _sampler("DPM2", ["k_dpm_2"], "karras", discard_next_to_last_sigma=True, second_order=True),
    _sampler("DPM2 a", ["k_dpm_2_a"], "karras", True,
             discard_next_to_last_sigma=True, uses_ensd=True, second_order=True),
    _sampler("DPM fast", ["k_dpm_fast"], "uniform", True, uses_ensd=True),
    _sampler("DPM adaptive", ["k_dpm_ad"], "uniform", True, uses_ensd=True),
    _sampler("Restart", ["restart"], "karras", True, second_order=True),
    _sampler("DDIM", ["ddim"], "ddim", True, uses_ensd=True),
    _sampler("PLMS", ["plms"]),
    _sampler("UniPC", ["unipc"]),
    _sampler("LCM", ["k_lcm"], "uniform", True),
)

_SAMPLER_LOOKUP: Mapping[str, SamplerInfo] = MappingProxyType({
    _norm(key): s for s in SAMPLERS for key in (s.name, *s.aliases)
})


def split_sampler_and_schedule(name: str) -> tuple[str, str | None]:
    """Split an A1111 legacy combined name: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras").

    A plain sampler name (or an unknown one) comes back unchanged with None.
    """
    text = " ".join(str(name or "").split())
    if _norm(text) in _SAMPLER_LOOKUP:
        return text, None
    lowered = text.lower()
    for sched in SCHEDULERS:
        for option in (sched.label, *sched.aliases):
            suffix = " " + option.lower()
            if lowered.endswith(suffix):
                base = text[: -len(suffix)].strip()
                if _norm(base) in _SAMPLER_LOOKUP:
                    return base, sched.label
    return text, None


def find_sampler(name: str) -> SamplerInfo:
    """Sampler by name or alias, case-insensitive; legacy combined names ("DPM++ 2M Karras") give their
    sampler. Unknown names raise UserError listing the valid samplers."""
    base, _ = split_sampler_and_schedule(name)
    found = _SAMPLER_LOOKUP.get(_norm(base))
    if found is None:
        raise UserError(f"Unknown sampler {name!r}. Valid samplers: {', '.join(s.name for s in SAMPLERS)}.")
    return found


def resolve_sampler(sampler_name: str | None, scheduler: str | None, default: str) -> tuple[SamplerInfo, str]:
    """-> (SamplerInfo, schedule label). Accepts A1111's combined legacy names like 'DPM++ 2M Karras'."""
    name = sampler_name or default
    base, legacy_schedule = split_sampler_and_schedule(name)
    info = find_sampler(base)
    schedule = scheduler or legacy_schedule or "automatic"
    for s in SCHEDULERS:
        if schedule.lower() in (s.name.lower(), s.label.lower()):
            return info, s.label
    raise UserError(f"Unknown schedule type {schedule!r}. Valid: {', '.join(s.label for s in SCHEDULERS)}")


@dataclass(frozen=True)
class SamplingChoice:
    """A request's sampler and schedule type, resolved once by the app process (`resolve_sampling`) and sent with
    the job; the engine runs what it holds. ``hires_*``: hires. fix's second pass (the first pass's unless the
    request names a hires sampler)."""
    sampler: SamplerInfo
    schedule: str  # a schedule type's label ("Automatic", "Karras", ...)
    hires_sampler: SamplerInfo
    hires_schedule: str


def resolve_sampling(req, default_sampler: str) -> SamplingChoice:
    """The sampling of a txt2img/img2img request (`default_sampler`: the job's setting, used when the request
    names none); an unknown name raises UserError listing the valid ones."""
    sampler, schedule = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler, default_sampler)
    hires_sampler, hires_schedule = sampler, schedule
    if getattr(req, "enable_hr", False) and getattr(req, "hr_sampler_name", None):
        hires_sampler, hires_schedule = resolve_sampler(req.hr_sampler_name, req.hr_scheduler or schedule, sampler.name)
    return SamplingChoice(sampler, schedule, hires_sampler, hires_schedule)


def sampler_fields(request) -> tuple:
    """The request fields its sampling is resolved from (`resolve_sampling`): a key for requests that share it."""
    return (request.sampler_name, request.sampler_index, request.scheduler, getattr(request, "hr_sampler_name", None),
            getattr(request, "hr_scheduler", None))
