"""ControlNet as an always-on script of the engine: its units become one sampling hook that adds the
ControlNets' residuals to the UNet (`backend.engine.always_on` calls `prepare`; the math is in `apply.py`,
loading and preprocessing in `runtime.py`), and the preprocessor-preview job (`detect`)."""
from __future__ import annotations

from pathlib import Path

from backend.core.preprocessor_catalog import ANNOTATORS_FOLDER
from backend.engine.controlnet.annotators import AnnotatorEnv
from backend.engine.controlnet.apply import ControlSet, flux_call_inputs
from backend.engine.controlnet.preprocessors import run_detect_job
from backend.engine.controlnet.runtime import ControlNetCache, prepare_controls
from backend.engine.sampling_hooks import HIRES_PASS, SamplingHook, StepState, UNetCall


class ControlNetHook(SamplingHook):
    """The residuals of the job's active units for each UNet call (FLUX: transformer call, the per-block
    `controlnet_block_samples` / `controlnet_single_block_samples`); in the hires. fix pass the units follow
    their hires option ("Both", "Low res only", "High res only")."""

    def __init__(self, controls: ControlSet):
        self.controls = controls

    def residuals(self, state: StepState, call: UNetCall) -> dict | None:
        if self.controls.family == "flux":
            return self.controls.flux_residuals(
                **flux_call_inputs(call, state.width, state.height), cond_mask=call.cond_mask, step=state.step,
                total_steps=state.total_steps, width=state.width, height=state.height,
                hires=state.pass_name == HIRES_PASS) or None
        return self.controls.residuals(
            sample=call.sample, timestep=call.timestep, context=call.context, added_cond_kwargs=call.added_cond_kwargs,
            cond_mask=call.cond_mask, step=state.step, total_steps=state.total_steps, width=state.width,
            height=state.height, hires=state.pass_name == HIRES_PASS) or None


class ControlNetRuntime:
    """What ControlNet keeps in the backend process between jobs: the loaded ControlNet models (placed beside the
    checkpoint they run with) and the annotators' weights."""

    def __init__(self, policy, models_dir: Path):
        self.controlnets = ControlNetCache(policy)
        self.annotators = AnnotatorEnv(Path(models_dir) / ANNOTATORS_FOLDER, device=str(policy.device))

    def clear(self) -> None:
        self.controlnets.clear()


def runtime(policy, models_dir: Path) -> ControlNetRuntime:
    return ControlNetRuntime(policy, models_dir)


def prepare(units: list, job, ctx, runtime: ControlNetRuntime) -> tuple[list[SamplingHook], list[bytes]]:
    """The units (`UnitJob`s, checked by the app) loaded and preprocessed -> ([hook] or [], detected maps)."""
    controls, maps = prepare_controls(units, ctx, runtime.controlnets, width=job.width, height=job.height,
                                      hires_size=job.hires_size, init_image=job.init_image, init_mask=job.init_mask,
                                      seed=job.seed, annotator_env=runtime.annotators)
    return ([ControlNetHook(controls)] if controls else []), maps


def detect(payload: dict, runtime: ControlNetRuntime) -> dict:
    """The `controlnet_detect` job (the API's /controlnet/detect, the UI's preview): the preprocessor's maps."""
    return run_detect_job(payload, runtime.annotators)
