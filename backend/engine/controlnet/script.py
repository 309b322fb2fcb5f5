"""ControlNet as an always-on script of the engine: its units become one sampling hook that adds the
ControlNets' residuals to the UNet (`backend.engine.always_on` calls `prepare`; the math is in `apply.py`,
loading and preprocessing in `runtime.py`)."""
from __future__ import annotations

from backend.engine.controlnet.apply import ControlSet
from backend.engine.controlnet.runtime import prepare_controls
from backend.engine.sampling_hooks import HIRES_PASS, SamplingHook, StepState, UNetCall


class ControlNetHook(SamplingHook):
    """The residuals of the job's active units for each UNet call; in the hires. fix pass the units follow
    their hires option ("Both", "Low res only", "High res only")."""

    def __init__(self, controls: ControlSet):
        self.controls = controls

    def residuals(self, state: StepState, call: UNetCall) -> dict | None:
        return self.controls.residuals(
            sample=call.sample, timestep=call.timestep, context=call.context, added_cond_kwargs=call.added_cond_kwargs,
            cond_mask=call.cond_mask, step=state.step, total_steps=state.total_steps, width=state.width,
            height=state.height, hires=state.pass_name == HIRES_PASS) or None


def prepare(units: list, job, ctx, resources) -> tuple[list[SamplingHook], list[bytes]]:
    """The units (`runtime.UnitJob`s, checked by the app) loaded and preprocessed -> ([hook] or [], detected maps).
    `resources`: the backend's state, with `controlnets` (ControlNetCache) and `annotators` (AnnotatorEnv)."""
    controls, maps = prepare_controls(units, ctx, resources.controlnets, width=job.width, height=job.height,
                                      hires_size=job.hires_size, init_image=job.init_image, init_mask=job.init_mask,
                                      seed=job.seed, annotator_env=resources.annotators)
    return ([ControlNetHook(controls)] if controls else []), maps
