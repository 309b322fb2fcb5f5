"""What every diffusion pipeline shares: the CFG denoiser, the sampling loop with
progress/interrupt/skip, latent decoding and previews, tiling, and infotext.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from backend.engine import schedules
from backend.engine.rng import BrownianNoise, ImageRNG
from backend.engine.conditioning import ScheduledConds, TextConditioner, stack_padded
from backend.engine.sampling_hooks import FIRST_PASS, HookChain, SamplingHook, StepState, UNetCall
from backend.core.errors import UserError
from backend.core.job_options import JobOptions

if TYPE_CHECKING:  # for JobContext's fields; these modules import the pipelines' neighbours, so not at run time
    from pathlib import Path

    from backend.checkpoints import ModelFile
    from backend.core.sampler_catalog import SamplingChoice
    from backend.engine.embeddings import JobEmbeddings
    from backend.engine.devices import DevicePolicy
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.postprocess.runtime import PostprocessRuntime

VERSION = "easel-0.1.0"
DEFAULT_DISTILLED_CFG = 3.5  # Forge's default "Distilled CFG Scale" (FLUX dev's guidance input)

class JobControl(Protocol):
    """What a pipeline needs from whoever runs it: stop flags and a place to report progress."""

    def interrupted(self) -> bool: ...
    def skipped(self) -> bool: ...
    def clear_skip(self) -> None: ...
    def begin(self, job_count: int, total_steps: int) -> None: ...
    def set_job(self, job_no: int) -> None: ...
    def step(self, preview: Callable[[], Image.Image] | None) -> None: ...


class StepClock:
    """A JobControl for running a pipeline directly (scripts, benchmarks, tests): never stops, and
    records the time of the job's start and of each finished sampling step."""

    def __init__(self):
        self.times: list[float] = []

    @property
    def steps(self) -> int:
        return max(0, len(self.times) - 1)

    def interrupted(self) -> bool: return False
    def skipped(self) -> bool: return False
    def clear_skip(self) -> None: pass
    def set_job(self, job_no: int) -> None: pass

    def begin(self, job_count: int, total_steps: int) -> None:
        self.times = [time.perf_counter()]

    def step(self, preview) -> None:
        self.times.append(time.perf_counter())


class _StopSampling(Exception):
    pass


@dataclass
class JobContext:
    """What a pipeline runs with besides its request: the model, the device policy, the settings, where to save.

    The request was checked at the edge (`backend.core.request_checks`, by the app) and its sampler resolved there
    (`sampling`); a pipeline trusts both and does not check them again.
    """

    loaded: LoadedModel  # the checkpoint, placed by the device policy
    policy: DevicePolicy
    options: JobOptions  # the job's settings (a dict given here is wrapped: missing keys read as their defaults)
    outputs_root: Path  # the data dir (output folders are relative to it)
    checkpoint: ModelFile  # with sha256
    vae: ModelFile | None  # the VAE file applied (None: the checkpoint's own)
    control: JobControl
    warnings: list[str] = field(default_factory=list)
    # Infotext entries added by features around the pipeline (LoRA hashes, always-on scripts, face restoration).
    extra_params: dict[str, object] = field(default_factory=dict)
    # The job's sampling hooks from its always-on scripts; the pipelines give them to every denoiser they build,
    # after their own (the inpainting latent mask).
    sampling_hooks: list[SamplingHook] = field(default_factory=list)
    # Upscaler models (hires. fix) and face restoration (restore_faces).
    postprocess: PostprocessRuntime | None = None
    # The textual-inversion embeddings the prompts may use (set with the job's LoRAs).
    embeddings: JobEmbeddings | None = None
    # The request's sampler and schedule types, resolved by the app (`sampler_catalog.resolve_sampling`); a pipeline
    # run directly (scripts, tests) resolves them the same way and passes them here.
    sampling: SamplingChoice | None = None
    # The enabled extensions' on_before_image_saved / on_image_saved callbacks (backend.engine.a1111_callbacks.
    # ImageSaveCallbacks): given to every save of the job's pictures; None: none registered.
    image_save: Any = None
    # Their on_cfg_denoiser callbacks (in sampling_hooks too; kept again when a script switches the model).
    extension_hooks: list[SamplingHook] = field(default_factory=list)
    # The prompt styles the job's requests name, {name: (prompt, negative prompt)} (`backend.core.styles`; the app
    # reads styles.csv): applied to every request's prompts as A1111's setup_prompts does.
    styles: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The job's AlwaysVisible AUTOMATIC1111 scripts (backend.engine.a1111_always_on.A1111AlwaysOn, also in
    # sampling_hooks): the request as their setup/before_process/process left it, their postprocess at the end.
    a1111_scripts: Any = None
    # The extra_params keys the always-on scripts set when last prepared (taken out when they are prepared again).
    script_params: set[str] = field(default_factory=set)
    # The live preview networks of the backend process (backend.engine.previews.PreviewDecoders); None (a pipeline
    # run directly): "Approx NN" and "TAESD" previews fall back to "Approx cheap".
    previews: Any = None
    # The interrogation models of the backend process (backend.engine.interrogate.runtime.InterrogateRuntime), for
    # scripts that caption pictures (Loopback's "Append interrogated prompt"); None: none available.
    interrogate: Any = None
    # Switches the model the job samples with, mid-job: `switch_model(which, request)` with which = "refiner" (the
    # request's refiner_checkpoint), "hires" (hr_checkpoint_name) or None (back to the generation's own checkpoint);
    # `ctx.loaded` follows, `ctx.checkpoint` keeps naming the generation's own; returns the file switched to (with its
    # sha256). Set by the worker (`backend.engine.worker`); None: the job has no second checkpoint.
    switch_model: Callable[..., Any] | None = None

    def __post_init__(self):
        self.options = JobOptions.of(self.options)

    @property
    def model(self):
        """The checkpoint's modules (backend.engine.model_loader.SDModel): `loaded.model`."""
        return self.loaded.model


@dataclass(frozen=True)
class UncondSkips:
    """When the denoiser skips the negative prompt's UNet pass and takes the prompt's prediction alone (as CFG 1),
    as A1111: `early`, the first fraction of the steps (`skip_early_cond`); `min_sigma`, below that noise level on
    every other model call (`s_min_uncond`, "NGMS"), or on all of them with `all_steps` (`s_min_uncond_all`)."""

    min_sigma: float = 0.0
    all_steps: bool = False
    early: float = 0.0

    def skip(self, call: int, step: int, total_steps: int, sigma: float) -> bool:
        if self.early > 0 and total_steps > 0 and step / total_steps <= self.early:
            return True
        return self.min_sigma > 0 and (call % 2 == 1 or self.all_steps) and sigma < self.min_sigma

    def infotext(self) -> dict[str, object]:
        """A1111's infotext entries: `Skip Early CFG`, `NGMS`, `NGMS all steps` (only when in use)."""
        return {"Skip Early CFG": self.early if self.early > 0 else None,
                "NGMS": self.min_sigma if self.min_sigma > 0 else None,
                "NGMS all steps": True if self.min_sigma > 0 and self.all_steps else None}


def uncond_skips(req, options: JobOptions) -> UncondSkips:
    """The job's `UncondSkips`: the request's `s_min_uncond` when given, else the settings'."""
    options = JobOptions.of(options)
    given = getattr(req, "s_min_uncond", None)
    return UncondSkips(min_sigma=float(given if given is not None else options["s_min_uncond"]),
                       all_steps=bool(options["s_min_uncond_all"]), early=float(options["skip_early_cond"]))


class CFGDenoiser:
    """model(x, sigma) -> denoised x0, with classifier-free guidance and per-step prompt schedules.

    Features that change sampling (the inpainting latent mask, always-on scripts, extensions) are `hooks`
    (backend.engine.sampling_hooks), given here and fixed for the denoiser's life; `pass_name` tells them which
    pass this is (FIRST_PASS, or HIRES_PASS for hires. fix). The sampling loop (`run_sampler`) reports the pass's
    length and each finished step through `start_pass`/`finish_step`."""

    def __init__(self, model, schedule: "schedules.DiscreteSchedule", conds: ScheduledConds, unconds: ScheduledConds,
                 cfg_scale: float, conditioner: TextConditioner, device, dtype, width: int, height: int,
                 image_cond: torch.Tensor | None = None, hooks: Sequence[SamplingHook] = (),
                 pass_name: str = FIRST_PASS, skips: UncondSkips = UncondSkips(),
                 aesthetic_scores: tuple[float, float] = (6.0, 2.5), distilled_cfg_scale: float = 3.5,
                 skip_layer_guidance=None):
        self.model = model
        self.schedule = schedule
        self.conds = conds
        self.unconds = unconds
        self.cfg_scale = float(cfg_scale)
        self.conditioner = conditioner
        self.device = device
        self.dtype = dtype
        self.image_cond = image_cond
        self.hooks = HookChain(hooks)
        self.pass_name = pass_name
        self.width, self.height = width, height
        self.skips = skips
        self._step = 0
        self._total_steps = 0
        self._calls = 0  # model calls in this pass (a second-order sampler makes two per step)
        self.length = max(conds.max_tokens(), unconds.max_tokens())
        self.empty_chunk = conditioner.empty_chunk() if self.length > 77 else None
        self.time_ids = None
        self.uncond_time_ids = None  # the negative prompt's, where they differ (the SDXL refiner's aesthetic score)
        # A flow-matching model (FLUX, SD3) is called its own way (backend.engine.families.flow_sampling): FLUX dev
        # gets the distilled guidance, SD3 optionally skip-layer guidance; CFG and the hooks stay as they are.
        self.flow_call = None
        if is_flow(model):
            from backend.engine.families.flow_sampling import FlowModelCall
            self.flow_call = FlowModelCall(model, schedule, distilled_cfg_scale, skip_layer_guidance)
        if model.family == "sdxl":
            # (original h, w, crop top, left, target h, w), as SDXL was trained.
            self.time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        elif model.family == "sdxl_refiner":
            # (original h, w, crop top, left, aesthetic score): the prompt gets the high score, the negative prompt
            # the low one (A1111's settings sdxl_refiner_high/low_aesthetic_score, `aesthetic_scores`)
            high, low = aesthetic_scores
            self.time_ids = torch.tensor([height, width, 0, 0, high], dtype=torch.float32, device=device)
            self.uncond_time_ids = torch.tensor([height, width, 0, 0, low], dtype=torch.float32, device=device)

    def start_pass(self, total_steps: int) -> None:
        """The sampler is about to run `total_steps` steps from the first."""
        self._step, self._total_steps, self._calls = 0, int(total_steps), 0

    def finish_step(self, i: int, x: torch.Tensor, denoised: torch.Tensor | None) -> None:
        """Step `i` (from 0) is done: the hooks see it, and the next model call belongs to step i + 1."""
        self.hooks.after_step(self.state(step=i), x, denoised)
        self._step = i + 1

    def state(self, step: int | None = None, sigma: torch.Tensor | None = None) -> StepState:
        """Where sampling stands, as hooks see it (the current step unless `step` is given)."""
        return StepState(pass_name=self.pass_name, step=self._step if step is None else step,
                         total_steps=self._total_steps, width=self.width, height=self.height, sigma=sigma)

    def _batch_conds(self, step: int, n: int):
        c, pc = stack_padded(self.conds.at(step)[:n], self.length, self.empty_chunk)
        u, pu = stack_padded(self.unconds.at(step)[:n], self.length, self.empty_chunk)
        return c, pc, u, pu

    def _unet(self, state: StepState, x_in: torch.Tensor, sigma_in: torch.Tensor, context: torch.Tensor,
              pooled: torch.Tensor | None, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.flow_call is not None:
            return self.flow_call(self.hooks, state, x_in, sigma_in, context, pooled, cond_mask, self.dtype)
        c_in = 1.0 / torch.sqrt(sigma_in ** 2 + 1.0)
        t = self.schedule.sigma_to_t(sigma_in)
        model_input = x_in * c_in[:, None, None, None]
        if self.image_cond is not None:
            model_input = torch.cat([model_input, self.image_cond.repeat(x_in.shape[0] // self.image_cond.shape[0], 1, 1, 1)], dim=1)
        added = None
        if self.time_ids is not None:
            time_ids = self.time_ids.unsqueeze(0).repeat(x_in.shape[0], 1)
            if self.uncond_time_ids is not None and cond_mask is not None:
                time_ids = torch.where(cond_mask.to(time_ids.device)[:, None] > 0, time_ids,
                                       self.uncond_time_ids.unsqueeze(0))
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        call = UNetCall(sample=model_input, timestep=t, context=context, added_cond_kwargs=added, cond_mask=cond_mask)
        if self.hooks:
            call = self.hooks.unet_inputs(state, call)
            residuals = self.hooks.residuals(state, call)  # added inside the UNet ({} when no hook gives any)
            if residuals:
                call = call.with_changes(extra={**call.extra, **residuals})
        kwargs = dict(call.extra)
        if call.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = call.added_cond_kwargs
        out = self.model.unet(call.sample.to(self.dtype), call.timestep.to(self.dtype),
                              encoder_hidden_states=call.context.to(self.dtype), return_dict=False, **kwargs)[0].float()
        sig = sigma_in[:, None, None, None]
        if self.model.prediction_type == "v_prediction":
            return x_in / (sig ** 2 + 1.0) - out * sig / torch.sqrt(sig ** 2 + 1.0)
        return x_in - out * sig

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        state = self.state(sigma=sigma)
        denoised = self._guided(state, x, sigma)
        if self.hooks:
            denoised = self.hooks.after_denoise(state, x, denoised)  # e.g. the inpainting latent mask
        return denoised

    def _guided(self, state: StepState, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c, pc, u, pu = self._batch_conds(self._step, n)
        call, self._calls = self._calls, self._calls + 1
        if self.cfg_scale == 1.0 or self.skips.skip(call, self._step, self._total_steps, float(sigma.reshape(-1)[0])):
            return self._flow_push(self._unet(state, x, sigma, c, pc))
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        context = torch.cat([c, u])
        pooled = torch.cat([pc, pu]) if pc is not None else None
        cond_mask = torch.cat([torch.ones(n, device=x.device), torch.zeros(n, device=x.device)])
        denoised = self._unet(state, x_in, sigma_in, context, pooled, cond_mask)
        d_cond, d_uncond = denoised[:n], denoised[n:]
        return self._flow_push(self.hooks.combine_cfg(state, d_cond, d_uncond, self.cfg_scale))

    def _flow_push(self, guided: torch.Tensor) -> torch.Tensor:
        """SD3's skip-layer guidance is added after CFG (`FlowModelCall.take_push`); other models: as it is."""
        return guided if self.flow_call is None else self.flow_call.take_push(guided)

    def after_sampling(self, latents: torch.Tensor) -> torch.Tensor:
        """The pass's final latents through the hooks (e.g. the latent mask's last blend)."""
        return self.hooks.after_sampling(self.state(step=self._total_steps), latents) if self.hooks else latents

    def after_decode(self, images: list[Image.Image]) -> list[Image.Image]:
        """The pass's decoded pictures through the hooks."""
        return self.hooks.after_decode(self.state(step=self._total_steps), images) if self.hooks else images


def flow_guidance(req, options: JobOptions | None = None, model=None) -> dict:
    """The job's guidance for a flow model's denoiser (`CFGDenoiser` keywords): FLUX dev's distilled guidance
    ("Distilled CFG Scale", `distilled_cfg_scale`, 3.5 when the request has none) and, for an SD3 `model`, its
    skip-layer guidance (settings `sd3_slg_*`; None when off); other models ignore both."""
    value = getattr(req, "distilled_cfg_scale", None)
    out = {"distilled_cfg_scale": DEFAULT_DISTILLED_CFG if value is None else float(value)}
    if options is not None and getattr(model, "family", None) == "sd3":
        from backend.engine.families.flow_sampling import skip_layer_guidance
        out["skip_layer_guidance"] = skip_layer_guidance(JobOptions.of(options))
    return out


def is_flow(model) -> bool:
    """A flow-matching model (FLUX, SD3): sampled on the flow x = (1 - sigma) * x0 + sigma * noise."""
    return getattr(model, "prediction_type", None) == "flow"


def noised_latents(model, latents: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """A clean latent brought to noise level `sigma` for sampling from there (img2img, hires. fix): latents + sigma *
    noise (SD), (1 - sigma) * latents + sigma * noise on a flow model's flow."""
    if is_flow(model):
        return latents * (1 - sigma) + noise * sigma
    return latents + noise * sigma


def latent_preview(ctx: JobContext, latent: torch.Tensor) -> Image.Image:
    """The live preview of the first image of a batch (the sampler's x0 prediction), by the method of the setting
    `show_progress_type`, at the pass's size (`backend.engine.previews`)."""
    from backend.engine.previews import make_preview
    return make_preview(ctx.options["show_progress_type"], ctx.model.family, latent,
                        latent.shape[-1] * 8, latent.shape[-2] * 8, ctx.previews,
                        lambda first: decode_latents(ctx, first, method="Full")[0])


def run_sampler(ctx: JobContext, sampler_info, denoiser: CFGDenoiser, x: torch.Tensor, sigmas: torch.Tensor,
                noise_sampler: Callable, extra: dict, preview_every: int,
                token_merging: float = 0.0) -> tuple[torch.Tensor, str | None]:
    """Run one sampling pass with progress, previews, Interrupt and Skip; `token_merging`: the pass's token merging
    ratio (`backend.engine.token_merging`: the UNet's hooks for this pass only).

    Returns (latents, stop reason or None). When stopped early, the latents are
    the last x0 prediction, so the user still gets the picture as it stood (A1111).
    """
    state = {"denoised": None}
    control = ctx.control

    def callback(d: dict) -> None:
        state["denoised"] = d.get("denoised")
        i = d["i"]
        denoiser.finish_step(i, d["x"], d.get("denoised"))
        preview = None
        if preview_every > 0 and (i + 1) % preview_every == 0 and d.get("denoised") is not None:
            latent = d["denoised"]
            preview = lambda: latent_preview(ctx, latent)  # noqa: E731
        control.step(preview)
        if control.interrupted() or control.skipped():
            raise _StopSampling()

    denoiser.start_pass(len(sigmas) - 1)
    if control.interrupted() or control.skipped():
        return x, "interrupted" if control.interrupted() else "skipped"
    from backend.engine.token_merging import token_merging as merging_tokens
    sample_fn = sampler_info.sample_fn
    if is_flow(ctx.model):
        from backend.engine.families.flow_sampling import flow_sample_fn
        sample_fn = flow_sample_fn(sampler_info, extra)
        if token_merging:  # ToMe merges a UNet's tokens; Forge has none for FLUX/SD3 either
            warning = "Token merging works on SD 1.x/2.x/SDXL UNets only; it was not applied to this FLUX/SD3 model."
            if warning not in ctx.warnings:
                ctx.warnings.append(warning)
            token_merging = 0.0
    try:
        with merging_tokens(ctx.model.unet, token_merging):
            result = sample_fn(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback, **extra)
        return result, None
    except _StopSampling:
        reason = "interrupted" if control.interrupted() else "skipped"
        return (state["denoised"] if state["denoised"] is not None else x), reason


# The sampler knobs each sampler takes, as AUTOMATIC1111's KDiffusionSampler passes them (its
# sampler_extra_params); the others sample with the defaults below.
SAMPLER_KNOBS: dict[str, tuple[str, ...]] = {
    "Euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "Heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "DPM2": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "DPM fast": ("s_noise",),
    "DPM2 a": ("s_noise",),
    "DPM++ 2S a": ("s_noise",),
    "DPM++ SDE": ("s_noise",),
    "DPM++ 2M SDE": ("s_noise",),
    "DPM++ 2M SDE Heun": ("s_noise",),
    "DPM++ 3M SDE": ("s_noise",),
}
KNOB_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
# Their infotext names (A1111's), written when a knob the sampler takes is not at its default.
KNOB_INFOTEXT = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}


def aesthetic_scores(options) -> tuple[float, float]:
    """The SDXL refiner's (prompt, negative prompt) aesthetic scores, from the job's settings."""
    options = JobOptions.of(options)
    return float(options["sdxl_refiner_high_aesthetic_score"]), float(options["sdxl_refiner_low_aesthetic_score"])


def sampler_extra_args(sampler_info, req, options: JobOptions) -> dict:
    """eta and the churn/noise knobs the sampler takes: the request's value when it gives one, else the setting
    (s_churn, s_tmin, s_tmax, s_noise; an s_tmax of 0 means no upper bound, as in A1111)."""
    extra = {}
    options = JobOptions.of(options)
    is_ddim = sampler_info.name == "DDIM"
    eta = req.eta if req.eta is not None else options["eta_ddim" if is_ddim else "eta_ancestral"]
    extra["eta"] = float(eta)
    for key in SAMPLER_KNOBS.get(sampler_info.name, ()):
        value = getattr(req, key, None)
        value = float(options[key] if value is None else value)
        if key == "s_tmax" and value == 0:
            value = float("inf")
        extra[key] = value
    return extra


def sampler_params(sampler_info, extra: dict, options: JobOptions) -> dict[str, object]:
    """The infotext entries of the sampler's noise as A1111 writes them: "Sigma churn" ... for knobs off their
    defaults, "RNG" when the source is not the GPU's, "ENSD" when it is set and the sampler is one A1111 marks as
    using it (ancestral samplers with eta > 0)."""
    options = JobOptions.of(options)
    params: dict[str, object] = {}
    for key, label in KNOB_INFOTEXT.items():
        if key in extra and extra[key] != KNOB_DEFAULTS[key]:
            params[label] = format_number(extra[key])
    ensd = int(options["eta_noise_seed_delta"] or 0)
    if ensd and extra.get("eta", 1.0) != 0 and sampler_info.options.get("uses_ensd", False):
        params["ENSD"] = ensd
    if options["randn_source"] != "GPU":
        params["RNG"] = options["randn_source"]
    return params


def image_rng(ctx: JobContext, shape, seeds, subseeds, req) -> ImageRNG:
    """The batch's noise generators with the job's settings (`randn_source`, `eta_noise_seed_delta`)."""
    options = ctx.options
    return ImageRNG(shape, seeds, subseeds, req.subseed_strength, req.seed_resize_from_h, req.seed_resize_from_w,
                    source=options["randn_source"], device=ctx.policy.device,
                    ensd=int(options["eta_noise_seed_delta"] or 0))


def sampler_noise(sampler_info, rng: ImageRNG, like: torch.Tensor, sigmas: torch.Tensor, seeds,
                  sigma_max: float | None = None) -> Callable[[float, float], torch.Tensor]:
    """What the sampler draws its noise from, as in A1111: the SDE samplers (option brownian_noise) a Brownian tree
    per image seeded with its seed (`BrownianNoise`; `sigma_max`: the top of the whole schedule when `sigmas` is a
    cut of it), the others the batch's generators (`rng.next()`, seed + ENSD when ENSD is set)."""
    if sampler_info.options.get("brownian_noise", False):
        return BrownianNoise(like, sigmas, seeds, sigma_max=sigma_max)
    device = like.device
    return lambda _s, _sn: rng.next().to(device)


NAN_RETRY_PARAM = ("VAE precision", "float32 (NaN retry)")


def vae_tiling_for(ctx: JobContext, width: int, height: int) -> tuple[int, int] | None:
    """(tile, overlap) in pixels when this VAE pass should be tiled (setting `vae_tiling`), else None."""
    from backend.engine.vae_tiling import should_tile
    options, policy = ctx.options, ctx.policy
    setting = options["vae_tiling"]
    tile, overlap = int(options["vae_tile_size"]), int(options["vae_tile_overlap"])
    mode_for = getattr(policy, "mode_for", None)
    if setting == "Automatic" and mode_for is not None and mode_for(ctx.loaded) == "lowvram":
        setting = "Always"  # streamed UNet: the VAE gets a tile's worth of memory
    free = policy.device_free_bytes() if hasattr(policy, "device_free_bytes") else None
    dtype = next(ctx.model.vae.parameters()).dtype
    return (tile, overlap) if should_tile(setting, width, height, dtype=dtype, free_bytes=free, tile=tile) else None


def _decode_one(ctx: JobContext, z: torch.Tensor) -> torch.Tensor:
    from backend.engine.vae_tiling import decode_tiled
    model = ctx.model
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    down = int(getattr(model, "vae_downsample", 8))
    z = z.to(ctx.policy.device, dtype)
    tiles = vae_tiling_for(ctx, z.shape[-1] * down, z.shape[-2] * down)
    if tiles is not None:
        return decode_tiled(vae, z, tile=tiles[0], overlap=tiles[1], downsample=down)
    return vae.decode(z, return_dict=False)[0].float()


def taesd_network(ctx: JobContext, part: str) -> torch.nn.Module | None:
    """TAESD's "decoder" or "encoder" for the job's model (settings `sd_vae_decode_method`/`sd_vae_encode_method`),
    from the backend process's networks (`backend.engine.previews.PreviewDecoders`: found in models/VAE-taesd or
    downloaded there on first use; FLUX's and SD3's are taef1 and taesd3). None, with a warning in the job's warnings
    (once per job), where there is none: no file and no download (offline), no networks (a pipeline run directly);
    the caller then uses the full VAE, as the job never fails for it."""
    from backend.engine.previews import LATENT_CHANNELS, latent_kind
    setting = "VAE type for decode" if part == "decoder" else "VAE type for encode"
    net, why = None, None
    if int(getattr(ctx.model, "latent_channels", 4)) != LATENT_CHANNELS[latent_kind(ctx.model.family)]:
        why = "no TAESD fits this model's latents"
    elif ctx.previews is None:
        why = "no TAESD networks in this run"
    else:
        net = ctx.previews.network("TAESD" if part == "decoder" else "TAESD encoder", ctx.model.family,
                                   use=f"TAESD {part}", fallback="the full VAE is used")
        if net is None:
            why = "its file is not in models/VAE-taesd and could not be downloaded (see the log)"
    if net is None:
        warning = f"{setting}: TAESD was not used ({why}); the full VAE was."
        if warning not in ctx.warnings:
            ctx.warnings.append(warning)
    return net


@torch.no_grad()
def _taesd_decode(ctx: JobContext, net: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """Latents as the UNet sees them -> pictures by TAESD's decoder (float32; it gives [0, 1])."""
    device = ctx.policy.device
    net.to(device)
    images = []
    for i in range(latents.shape[0]):
        rgb = net(latents[i:i + 1].to(device, torch.float32))[0].clamp(0, 1)
        arr = (rgb * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(arr))
    ctx.extra_params["VAE Decoder"] = "TAESD"  # A1111's infotext entry (written when not "Full")
    return images


@torch.no_grad()
def decode_latents(ctx: JobContext, latents: torch.Tensor, method: str | None = None) -> list[Image.Image]:
    """VAE-decode latents to PIL images (tiled for large images, setting `vae_tiling`).

    `method`: "Full" (the checkpoint's VAE) or "TAESD" (TAESD's decoder; the full VAE, with a warning, where there
    is none: `taesd_network`); None: the job's setting `sd_vae_decode_method` (A1111's "VAE type for decode"), as the
    final pictures and hires. fix's first pass are decoded. Live previews pass "Full" (their own setting).

    A1111's NaN check: when the half-precision VAE produces NaN, the model's VAE is switched to float32
    for good (setting `auto_vae_precision`) and the image decoded again; the infotext says so.
    `--disable-nan-check` turns the check off.
    """
    method = ctx.options["sd_vae_decode_method"] if method is None else method
    if method == "TAESD":
        net = taesd_network(ctx, "decoder")
        if net is not None:
            return _taesd_decode(ctx, net, latents)
    model = ctx.model
    policy = ctx.policy
    images = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1] / model.vae_scale_factor + getattr(model, "vae_shift_factor", 0.0)
        decoded = _decode_one(ctx, z)
        if getattr(policy, "nan_check", True) and torch.isnan(decoded).any():
            dtype = next(model.vae.parameters()).dtype
            if dtype == torch.float32 or not ctx.options["auto_vae_precision"]:
                raise UserError("A tensor with NaNs was produced in the VAE"
                                + (" in float32; the latents are not finite" if dtype == torch.float32 else
                                   "; turn on 'Automatically revert VAE to 32-bit floats' or use --no-half-vae")
                                + ". Use --disable-nan-check to get the image anyway.")
            if hasattr(policy, "upcast_vae"):
                policy.upcast_vae(ctx.loaded)
            else:
                model.vae.to(torch.float32)
                ctx.loaded.vae_upcast = True
            ctx.warnings.append("A tensor with NaNs was produced in the VAE; the VAE now runs in float32 "
                                "for this checkpoint and the image was decoded again.")
            decoded = _decode_one(ctx, z)
        if ctx.loaded.vae_upcast and getattr(policy, "vae_dtype", torch.float32) != torch.float32:
            ctx.extra_params[NAN_RETRY_PARAM[0]] = NAN_RETRY_PARAM[1]
        arr = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(arr))
    return images


@torch.no_grad()
def encode_images(ctx: JobContext, images: list[Image.Image], method: str = "Full") -> torch.Tensor:
    """PIL images -> scaled latents (the VAE's mean, as A1111 uses for img2img and hires. fix): (mean - shift) * scale,
    the shift 0 but for the 16-channel VAEs of FLUX and SD3.

    `method`: "Full" (the checkpoint's VAE) or "TAESD" (TAESD's encoder, which gives the scaled latents itself; the
    full VAE, with a warning, where there is none); img2img's and hires. fix's encodes pass the job's setting
    `sd_vae_encode_method` (A1111's "VAE type for encode"), the inpainting conditioning keeps the full VAE (A1111)."""
    if method == "TAESD":
        net = taesd_network(ctx, "encoder")
        if net is not None:
            device = ctx.policy.device
            net.to(device)
            out = [net((image_to_tensor(img).to(device) + 1) / 2).float() for img in images]  # TAESD takes [0, 1]
            ctx.extra_params["VAE Encoder"] = "TAESD"
            return torch.cat(out)
    return torch.cat([encode_tensor(ctx, image_to_tensor(img)) for img in images])


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode_tensor(ctx: JobContext, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents, one image at a time (peak memory of one; tiled when large)."""
    from backend.engine.vae_tiling import encode_tiled
    model = ctx.model
    dtype = next(model.vae.parameters()).dtype
    down = int(getattr(model, "vae_downsample", 8))
    tiles = vae_tiling_for(ctx, x.shape[-1], x.shape[-2])
    out = []
    for i in range(x.shape[0]):
        image = x[i:i + 1].to(ctx.policy.device, dtype)
        if tiles is not None:
            mean = encode_tiled(model.vae, image, tile=tiles[0], overlap=tiles[1], downsample=down)
        else:
            mean = model.vae.encode(image, return_dict=False)[0].mean.float()
        out.append((mean - getattr(model, "vae_shift_factor", 0.0)) * model.vae_scale_factor)
    return torch.cat(out)


class _Tiled:
    """The models a job tiles (`tiling`): the job's own, and each it switches to (the refiner: `add`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: list[tuple[torch.nn.Conv2d, str]] = []
        self.models: list = []

    def add(self, model) -> None:
        if not self.enabled or any(m is model for m in self.models):
            return
        self.models.append(model)
        for part in (model.unet, model.vae):
            for m in part.modules():
                if isinstance(m, torch.nn.Conv2d):
                    self.saved.append((m, m.padding_mode))
                    m.padding_mode = "circular"

    def restore(self) -> None:
        for m, mode in reversed(self.saved):
            m.padding_mode = mode
        self.saved, self.models = [], []


@contextlib.contextmanager
def tiling(model, enabled: bool):
    """Seamless tiling: circular padding in every conv of the UNet and VAE for the duration of a job; yields the
    set of tiled models, to which a model the job switches to is added (`add`), restored at the end too."""
    tiled = _Tiled(enabled)
    tiled.add(model)
    try:
        yield tiled
    finally:
        tiled.restore()


def format_number(value: float) -> object:
    """7.0 -> 7, 7.5 -> 7.5 (A1111 writes integral floats without the .0)."""
    return int(value) if float(value).is_integer() else value
