"""The refiner: a second checkpoint that takes over sampling part-way (AUTOMATIC1111 1.6+'s Refiner).

A1111 switches inside its denoiser: at the first model call whose noise level is past `refiner_switch_at` of the
training schedule (the timestep nearest the sigma, t: completed = (999 - t) / 1000), it loads the refiner, encodes
the prompts with the refiner's text encoders and goes on with the same latent, the same sampler and its history,
and the same noise stream. `RefinerDenoiser` does the same around a pass's `CFGDenoiser`: the sampler never sees a
difference. A switch point at 1.0 or above is never reached (completed stays below 1): no refiner.

With hires. fix, setting `hires_fix_refiner_pass` chooses the pass(es) it runs in (A1111's default: the second).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from backend.core.errors import UserError
from backend.core.second_checkpoints import refiner_name
from backend.engine.sampling_hooks import FIRST_PASS, HIRES_PASS

if TYPE_CHECKING:
    from backend.engine.pipelines.common import CFGDenoiser, JobContext

# setting hires_fix_refiner_pass -> the passes the refiner runs in
REFINER_PASSES = {"first pass": (FIRST_PASS,), "second pass": (HIRES_PASS,), "both passes": (FIRST_PASS, HIRES_PASS)}


def completed_ratio(table_sigmas: torch.Tensor, sigma: torch.Tensor) -> float:
    """How far sampling has come at `sigma`, as A1111 measures it for the refiner: the nearest training timestep t
    of the model's schedule (`table_sigmas`, ascending with t) -> (T - 1 - t) / T."""
    t = int(torch.argmin((table_sigmas.to(sigma.device, torch.float32) - sigma.max().float()).abs()))
    total = len(table_sigmas)
    return (total - 1 - t) / total


def short_title(checkpoint) -> str:
    """A1111's short title of a checkpoint for infotexts: the file's name without folder and extension, [hash]."""
    name = Path(checkpoint.name).stem
    return f"{name} [{checkpoint.shorthash}]" if checkpoint.shorthash else name


def refiner_switch_at(ctx: JobContext, req, pass_name: str, hires: bool) -> float | None:
    """The switch point when the request's refiner runs in this pass (-inf: from the first step), else None."""
    if refiner_name(req) is None or ctx.switch_model is None:
        return None
    if hires:
        choice = str(ctx.options["hires_fix_refiner_pass"])
        if pass_name not in REFINER_PASSES.get(choice, (HIRES_PASS,)):
            return None
    switch_at = req.refiner_switch_at
    return float("-inf") if switch_at is None else float(switch_at)


def latent_space(model) -> tuple[str, int]:
    """What a model's latents are: ("flow" or "noise", channels). FLUX and SD3 sample on a flow with 16 channels;
    SD 1.x/2.x/SDXL add noise to 4 channels."""
    return ("flow" if getattr(model, "prediction_type", None) == "flow" else "noise",
            int(getattr(model, "latent_channels", 4)))


def check_same_latents(current, new, what: str) -> None:
    """A model that takes over a pass's latents mid-sampling (the refiner) must work on the same kind of latent."""
    if latent_space(current) != latent_space(new) or (latent_space(new)[0] == "flow"
                                                      and current.family != new.family):
        raise UserError(f"{what} cannot continue this picture: it is a {_family_label(new)} model and the picture "
                        f"is sampled with a {_family_label(current)} model, whose latents it cannot read. Choose a "
                        "refiner of the same family.")


def _family_label(model) -> str:
    return {"flux": "FLUX.1", "sd3": "Stable Diffusion 3"}.get(getattr(model, "family", ""), "Stable Diffusion")


class RefinerDenoiser:
    """A pass's denoiser that hands over to the refiner at `switch_at` (see the module's docstring).

    `rebuild(request)` makes the pass's denoiser again for the model now in `ctx` (its own text conditioner, prompt
    schedules and noise schedule); it is called once, right after the switch. Everything else (start_pass,
    finish_step, after_sampling, ...) goes to the denoiser in use."""

    def __init__(self, ctx: JobContext, first: CFGDenoiser, switch_at: float, request,
                 rebuild: Callable[[], CFGDenoiser], hires: bool = False):
        self.ctx, self.current, self.switch_at = ctx, first, switch_at
        self.request, self.rebuild, self.hires = request, rebuild, hires
        self.switched = False

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.switched and completed_ratio(self.current.schedule.sigmas, sigma) >= self.switch_at:
            self._switch()
        return self.current(x, sigma)

    def _switch(self) -> None:
        ctx, old = self.ctx, self.current
        refiner_file = ctx.switch_model("refiner", self.request)
        check_same_latents(old.model, ctx.model, f"The refiner {short_title(refiner_file)}")
        new = self.rebuild()
        new._step, new._total_steps = old._step, old._total_steps  # the hooks see one pass going on
        self.current, self.switched = new, True
        ctx.extra_params["Refiner"] = short_title(refiner_file)
        switch_at = self.request.refiner_switch_at
        ctx.extra_params["Refiner switch at"] = None if switch_at is None else _number(switch_at)
        if self.hires:
            choice = str(ctx.options["hires_fix_refiner_pass"])
            if choice != "second pass":
                ctx.extra_params["Hires refiner"] = choice

    def __getattr__(self, name: str):
        return getattr(self.current, name)


def _number(value: float):
    return int(value) if float(value).is_integer() else value
