"""The backend process: owns torch and the device, runs one job at a time.

It talks to the app process through two queues (jobs in, events out) and two
shared flags (interrupt, skip). Events: `ready`, `progress`, `result`, `error`; the
result and error events carry the paths of the checkpoints then loaded
(`checkpoints`), which the app's queue routes jobs on. With `--backend-workers N`
there are N such processes (or Ray actors, `backend/workers/ray_actor.py`, which
run the same `build_state` and `answer_job`); `assign_device` picks each one's device.
Loaded checkpoints stay in a least-recently-used cache (the active one on the
device, the others in RAM), so switching back to a cached one reads no file.

Each job kind has one handler in `JOB_HANDLERS`, called with the process's
`WorkerState`, the job's payload and its progress/stop control (`run_job`).
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypedDict

from backend.core.unet_layout import FLOW_FAMILIES  # torch-free
from backend.engine.always_on import SCRIPT_JOBS, ScriptRuntimes  # torch-free

if TYPE_CHECKING:  # the worker's modules import torch: loaded when a job needs them
    from PIL import Image

    from backend.checkpoints import HashCache, ModelFile
    from backend.core.sampler_catalog import SamplingChoice
    from backend.core.schemas import GenerationResult, Img2ImgRequest, Txt2ImgRequest
    from backend.engine.devices import DevicePolicy
    from backend.engine.loaded_model import LoadedModel
    from backend.engine.pipelines.common import JobContext, JobControl
    from backend.engine.postprocess.runtime import PostprocessRuntime
    from backend.engine.interrogate.runtime import InterrogateRuntime
    from backend.engine.networks.activation import NetworkRuntime
    from backend.postprocess.schemas import ExtrasResult

log = logging.getLogger("easel.backend")


class SharedFlags:
    """Interrupt/skip flags shared with the app process (multiprocessing Values)."""

    def __init__(self, interrupt, skip):
        self.interrupt_flag = interrupt
        self.skip_flag = skip


class WorkerJobControl:
    """`JobControl` for the pipelines: reads the shared flags, sends progress events."""

    def __init__(self, job_id: str, events, flags: SharedFlags, preview_format: str = "PNG"):
        self.job_id = job_id
        self.events = events
        self.flags = flags
        self.job_count = 1
        self.job_no = 0
        self.total_steps = 0
        self.done_steps = 0
        self.preview_format = preview_format

    def interrupted(self) -> bool:
        return bool(self.flags.interrupt_flag.value)

    def skipped(self) -> bool:
        return bool(self.flags.skip_flag.value)

    def clear_skip(self) -> None:
        self.flags.skip_flag.value = 0

    def interrupt(self) -> None:
        """Stop the job, as the Interrupt button (an AUTOMATIC1111 script's `shared.state.interrupt()`)."""
        self.flags.interrupt_flag.value = 1

    def skip(self) -> None:
        """Skip the current batch, as the Skip button (`shared.state.skip()`)."""
        self.flags.skip_flag.value = 1

    def begin(self, job_count: int, total_steps: int) -> None:
        self.job_count, self.total_steps, self.done_steps = job_count, total_steps, 0
        self._send(None)

    def set_job(self, job_no: int) -> None:
        self.job_no = job_no
        self._send(None)

    def step(self, preview) -> None:
        self.done_steps += 1
        png = None
        if preview is not None:
            import io
            buf = io.BytesIO()
            preview().save(buf, format="PNG")
            png = buf.getvalue()
        self._send(png)

    def _send(self, preview_png) -> None:
        self.events.put({"type": "progress", "job_id": self.job_id, "job_no": self.job_no, "job_count": self.job_count,
                         "step": self.done_steps, "total": self.total_steps, "preview": preview_png, "time": time.time()})


class ModelCache:
    """LRU cache of loaded checkpoints (setting `sd_checkpoints_limit`), one `LoadedModel` per file.

    The active checkpoint is placed by the device policy. The others stay loaded: on the device while
    the active one still has its room there (resident, with its sampling reserve free), otherwise in
    RAM, so switching back reads no file. Eviction is least-recently-used, past the limit and before
    loading a new file when free RAM would not hold it; an evicted model is dropped whole (its hooks
    removed, no reference kept), so RAM does not grow across switches.

    A FLUX/SD3 transformer completed with separate parts (VAE / text encoder files) is one entry per
    (file, parts): the same file with other parts is another model (`families.loading.load_flow_checkpoint`).
    """

    RAM_MARGIN = 1 << 30  # RAM left free besides the new model when deciding to evict before a load

    def __init__(self, policy, hashes, models_dir: Path | None = None):
        self.policy = policy
        self.hashes = hashes
        self.models_dir = models_dir  # where FLUX/SD3 loading finds the T5 tokenizer (models/text_encoder)
        self.models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self.families: dict[tuple, str] = {}  # (path, size, mtime) -> the file's family, read from its header
        self.loads = 0
        self.evictions = 0
        self.available_ram = None  # callable -> bytes; None: psutil (tests inject their own)

    def get(self, path: Path, limit: int, parts: tuple[Path, ...] | list[Path] = (),
            loader: Callable | None = None) -> LoadedModel:
        """The checkpoint at `path`, loaded or from the cache. `parts`: the files chosen in "VAE / Text Encoder",
        which complete a FLUX.1 / SD3 file (part of its cache key: the same transformer with another T5 is another
        model); an SD checkpoint ignores them. `loader(path, parts, dtype=, vae_dtype=, text_dtype=, device=)`
        replaces the loading by family (tests)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        family = self.family_of(path, key) if loader is None else "loader"
        parts = tuple(Path(p) for p in parts) if family in FLOW_FAMILIES or loader is not None else ()
        if parts:
            key = key + tuple((str(p), p.stat().st_size, p.stat().st_mtime) for p in parts)
        if key in self.models and self._too_narrow(self.models[key]):
            # loaded in a smaller dtype than the policy now wants (cpu_bf16 turned off): read it again
            self.policy.release(self.models.pop(key))
            gc.collect()
        if key in self.models:
            self.models.move_to_end(key)
            model = self.models[key]
        else:
            self._make_room_for(st.st_size + sum(p.stat().st_size for p in parts), limit)
            model = self._load(path, family, parts, loader)
            self.models[key] = model
        self._arrange(model)
        while len(self.models) > max(1, limit):
            self._evict_oldest()
        return model

    def family_of(self, path: Path, key: tuple) -> str:
        """The family of the checkpoint file (`families.loading.detect_family_of_file`, its header read once per
        version of the file)."""
        if key not in self.families:
            from backend.engine.families.loading import detect_family_of_file
            self.families[key] = detect_family_of_file(path)
        return self.families[key]

    def _load(self, path: Path, family: str = "unknown", parts: tuple[Path, ...] = (),
              loader: Callable | None = None) -> LoadedModel:
        from backend.engine.loaded_model import LoadedModel

        t0 = time.perf_counter()
        policy = self.policy
        if loader is not None:
            model = loader(path, list(parts), dtype=policy.dtype, vae_dtype=policy.vae_dtype,
                           text_dtype=getattr(policy, "text_dtype", None), device="cpu")
        elif family in FLOW_FAMILIES:  # FLUX.1 / SD3: the transformer completed with the chosen parts
            from backend.engine.families.loading import load_flow_checkpoint
            model = load_flow_checkpoint(path, list(parts), dtype=policy.dtype, vae_dtype=policy.vae_dtype,
                                         text_dtype=getattr(policy, "text_dtype", None), device="cpu",
                                         models_dir=self.models_dir)
        else:
            from backend.engine.model_loader import load_sd_model
            model = load_sd_model(path, dtype=policy.dtype, vae_dtype=policy.vae_dtype,
                                  text_dtype=getattr(policy, "text_dtype", None), device="cpu")
        self.loads += 1
        log.info("loaded %s%s (%s) in %.1f s", path.name, f" with {', '.join(Path(p).name for p in parts)}" if parts else "",
                 model.family, time.perf_counter() - t0)
        return LoadedModel(model, load_dtypes=self._wanted_dtypes())

    def _wanted_dtypes(self) -> tuple:
        policy = self.policy
        return (policy.dtype, policy.vae_dtype, getattr(policy, "text_dtype", None) or policy.dtype)

    def _too_narrow(self, loaded: LoadedModel) -> bool:
        dtypes = loaded.load_dtypes
        return dtypes is not None and any(a.itemsize < b.itemsize for a, b in zip(dtypes, self._wanted_dtypes()))

    def _ram_free(self) -> int:
        if self.available_ram is not None:
            return int(self.available_ram())
        import psutil
        return int(psutil.virtual_memory().available)

    def _make_room_for(self, file_size: int, limit: int) -> None:
        """Before reading a file: evict past the limit, then while free RAM would not hold the new model."""
        while len(self.models) >= max(1, limit):
            self._evict_oldest()
        need = int(file_size * 1.25) + self.RAM_MARGIN
        while self.models and self._ram_free() < need:
            log.info("free RAM %.1f GiB is short of %.1f GiB for the next checkpoint", self._ram_free() / 2**30, need / 2**30)
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        old_key, old = self.models.popitem(last=False)
        self.policy.release(old)
        self.evictions += 1
        del old
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("evicted %s from the checkpoint cache", Path(old_key[0]).name)

    def _arrange(self, model: LoadedModel) -> None:
        """Place the active model; keep the others on the device only while there is room for them."""
        from backend.engine.devices import INFERENCE_RESERVE, RESIDENT

        policy = self.policy
        others = [m for m in reversed(self.models.values()) if m is not model and m.placed]
        if policy.mode == "resident":  # on the CPU (or told so): nothing to arrange
            policy.place(model)
            return
        if policy.mode != "auto":  # medvram/lowvram: weights live in RAM; only the active model is hooked
            for other in others:
                policy.release(other)
            policy.place(model)
            return
        while others and policy.plan_for(model) != RESIDENT:  # make room for the active model, oldest first
            policy.release(others.pop())
        policy.place(model)
        reserve = INFERENCE_RESERVE.get(model.family or "sd1", 2 << 30)
        for other in others:
            if policy.mode_for(other) != "resident" or policy.device_free_bytes() < reserve:
                policy.release(other)

    def clear(self) -> None:
        for model in self.models.values():
            self.policy.release(model)
        self.models.clear()
        gc.collect()


class VaeSwitcher:
    """Applies the chosen VAE file to a checkpoint, keeping its own VAE (in `LoadedModel.vae`) to restore later.

    FLUX.1 / SD3 models have a 16-channel VAE (their own, or the part chosen in "VAE / Text Encoder"): a VAE
    file with another number of latent channels (the SD VAE setting's SD 1.x/2.x/SDXL VAE) is not applied to
    them; the model keeps its own and `apply` returns a warning saying so (the job runs)."""

    def __init__(self):
        self.files: dict[str, dict] = {}

    def apply(self, loaded: LoadedModel, vae_path: str | None) -> str | None:
        """Put VAE file `vae_path` (None: the checkpoint's own VAE) into the model. -> a warning when the file was
        not applied (a VAE of other latent channels for a FLUX/SD3 model), else None."""
        from backend.engine.model_loader import apply_vae_state_dict, load_vae_file

        choice, model = loaded.vae, loaded.model
        note = None
        if vae_path is not None and _is_flow_model(model):
            if vae_path not in self.files:
                self.files = {vae_path: load_vae_file(Path(vae_path))}
            channels = _latent_channels(self.files[vae_path])
            if channels != model.latent_channels:
                from backend.core.unet_layout import FAMILY_NAMES
                family = FAMILY_NAMES.get(model.family, model.family)
                note = (f"VAE {Path(vae_path).name} was not used: it has {channels} latent channels (a VAE for SD 1.x, "
                        f"2.x or SDXL); {family} models need a {model.latent_channels}-channel VAE, chosen in "
                        "'VAE / Text Encoder'. The model's own VAE was used.")
                log.warning(note)
                vae_path = None
        if choice.path == vae_path:
            return note
        if choice.own_state is None:
            choice.own_state = {k: v.detach().to("cpu", copy=True) for k, v in model.vae.state_dict().items()}
        if vae_path is None:
            apply_vae_state_dict(model, choice.own_state)
        else:
            if vae_path not in self.files:
                self.files = {vae_path: load_vae_file(Path(vae_path))}
            apply_vae_state_dict(model, self.files[vae_path])
        choice.path = vae_path
        return note


def _is_flow_model(model) -> bool:
    from backend.engine.devices.parts import is_flow
    return is_flow(model)


def _latent_channels(vae_state: dict) -> int:
    """Latent channels of a VAE state dict in diffusers names (the encoder's output holds mean and log-variance)."""
    weight = vae_state.get("encoder.conv_out.weight")
    return int(weight.shape[0]) // 2 if weight is not None else 4


# -- the jobs ----------------------------------------------------------------------------------------------------
@dataclass
class WorkerState:
    """What the backend process keeps from job to job: made once by `worker_main`, handed to every job handler."""

    policy: DevicePolicy  # device, dtypes and residency of every model
    hashes: HashCache  # the model files' sha256 (infotext hashes), cached on disk
    cache: ModelCache  # loaded checkpoints, least recently used first
    vae: VaeSwitcher  # the VAE file applied to the active checkpoint
    scripts: ScriptRuntimes | None = None  # what the always-on scripts keep between jobs (e.g. loaded ControlNets)
    postprocess: PostprocessRuntime | None = None  # upscaler and face restoration models
    networks: NetworkRuntime | None = None  # LoRA and embedding files
    previews: Any = None  # the live preview networks (backend.engine.previews.PreviewDecoders)
    interrogate: InterrogateRuntime | None = None  # the interrogation models (BLIP, CLIP, DeepDanbooru)


class GenerationPayload(TypedDict, total=False):
    """What the app process (`backend.service`) sends with a `load`, `txt2img`, `img2img` or `img2img_batch` job."""

    request: Txt2ImgRequest | Img2ImgRequest  # checked at the edge; its override_settings already merged into options
    sampling: SamplingChoice  # the request's sampler and schedule types, resolved by the service
    options: dict[str, Any]  # the settings the job runs with
    checkpoint: ModelFile
    vae: ModelFile | None
    checkpoint_fallbacks: list[tuple[ModelFile, ModelFile | None]]  # automatic choice: the next candidates
    checkpoint_notes: list[str]  # warnings about checkpoints passed over
    parts: list[ModelFile]  # the files chosen in "VAE / Text Encoder" (forge_additional_modules): FLUX.1 / SD3 parts
    data_dir: Path  # output folders are relative to it
    warnings: list[str]  # request fields accepted but not acted on
    scripts: dict[str, Any]  # the always-on scripts' arguments, checked and parsed by the app ({name: parsed})
    a1111_callbacks: list[tuple[str, str]]  # [(script file, extension)] whose script_callbacks run in every job
    init_images: list[Image.Image]  # img2img
    mask: Image.Image | None  # img2img
    color_correction_from: list[Image.Image]  # img2img in a script (Loopback): the pictures outputs take colours from
    each_image: Any  # in a script (Prompt matrix): `EachImage`, the prompts and seeds of each image of the batch
    batch: dict[str, Path | None]  # img2img_batch: input_dir, output_dir, mask_dir
    script: dict[str, Any]  # the selectable script (script_name) the job runs: {"name", "args"}, checked by the app
    # the refiners / hires. checkpoints the job's requests name: {name: {"checkpoint", "vae"}} (`_model_switcher`)
    second_checkpoints: dict[str, dict[str, Any]]
    firstpass_image: Image.Image  # txt2img with hires. fix: the picture its second pass starts from (A1111 1.7+)


# A job handler: (the worker's state, the job's payload, its progress/stop control) -> the result sent back.
JobHandler = Callable[["WorkerState", Any, "JobControl"], Any]


def _memory(state: WorkerState, payload: dict, control: JobControl) -> dict:
    return memory_report(state.policy.device)


def _unload(state: WorkerState, payload: dict, control: JobControl) -> dict:
    state.cache.clear()
    for runtime in (state.scripts, state.postprocess, state.interrogate):
        if runtime is not None:
            runtime.clear()
    return {"ok": True}


def _extras(state: WorkerState, payload: dict, control: JobControl) -> ExtrasResult:
    from backend.engine.postprocess.extras import run_extras_job
    return run_extras_job(payload, state.postprocess, control)


def _interrogate(state: WorkerState, payload: dict, control: JobControl) -> dict:
    from backend.engine.interrogate.job import run_interrogate_job
    return run_interrogate_job(payload, state.interrogate, control)


def _merge_checkpoints(state: WorkerState, payload: dict, control: JobControl) -> dict:
    from backend.engine.checkpoint_merger import run_merge
    return run_merge(payload, control, state.hashes)


def _script_job(kind: str) -> JobHandler:
    """The handler of a job kind an always-on script adds (`backend.engine.always_on.SCRIPT_JOBS`)."""
    def handler(state: WorkerState, payload: dict, control: JobControl) -> Any:
        from backend.engine.always_on import run_script_job
        return run_script_job(kind, payload, state.scripts)
    handler.__name__ = f"_script_job_{kind}"
    return handler


def _cache_info(state: WorkerState, payload: dict, control: JobControl) -> dict:
    return {"loads": state.cache.loads, "cached": [Path(k[0]).name for k in state.cache.models]}


@dataclass
class JobModel:
    """The job's checkpoint, loaded (or taken from the cache) and with its VAE applied."""

    model: LoadedModel
    checkpoint: ModelFile  # with its sha256
    vae: ModelFile | None  # with its sha256; None: the checkpoint's own
    notes: list[str]  # warnings about checkpoints passed over
    unloadable: dict[str, str]  # {path: why it did not load}


def _job_model(state: WorkerState, payload: GenerationPayload) -> JobModel:
    from backend.checkpoints import ModelFile
    from backend.core.job_options import JobOptions

    options = payload["options"]
    policy = state.policy
    policy.apply_options(options)
    loads = state.cache.loads
    model, ckpt, vae, load_notes, unloadable = _load_checkpoint(payload, state, int(JobOptions.of(options)["sd_checkpoints_limit"]))
    ckpt = ModelFile(name=ckpt.name, path=ckpt.path, sha256=ckpt.sha256 or state.hashes.sha256(ckpt.path))
    if state.cache.loads != loads and payload.get("a1111_callbacks"):  # read from its file (not the cache): A1111's
        from backend.engine.a1111_callbacks import JobCallbacks  # on_model_loaded of the enabled extensions
        JobCallbacks(payload["a1111_callbacks"], options).model_loaded(ckpt, model.family)
    if model.family in FLOW_FAMILIES:  # FLUX.1 / SD3 take their VAE from the file or "VAE / Text Encoder"
        vae = None  # (the SD VAE setting is for SD checkpoints: their 4-channel VAEs do not fit)
    if vae is not None:
        vae = ModelFile(name=vae.name, path=vae.path, sha256=vae.sha256 or state.hashes.sha256(vae.path))
    policy.settle(model)  # weights in RAM while the VAE is swapped
    vae_note = state.vae.apply(model, str(vae.path) if vae else None)
    if vae_note is not None:  # a VAE file that does not fit a FLUX/SD3 model: its own VAE runs (and is named)
        load_notes, vae = [*load_notes, vae_note], None
    return JobModel(model, ckpt, vae, load_notes, unloadable)


def _load(state: WorkerState, payload: GenerationPayload, control: JobControl) -> dict:
    loaded = _job_model(state, payload)
    return {"loaded": loaded.checkpoint.title, "family": loaded.model.family,
            "vae": loaded.vae.name if loaded.vae else None, "warnings": loaded.notes,
            "unloadable_checkpoints": loaded.unloadable}


def _txt2img(state: WorkerState, payload: GenerationPayload, control: JobControl) -> GenerationResult:
    return _generate("txt2img", state, payload, control, _run_txt2img)


def _img2img(state: WorkerState, payload: GenerationPayload, control: JobControl) -> GenerationResult:
    return _generate("img2img", state, payload, control, _run_img2img)


def _img2img_batch(state: WorkerState, payload: GenerationPayload, control: JobControl) -> GenerationResult:
    return _generate("img2img_batch", state, payload, control, _run_img2img_batch)


def _generate(kind: str, state: WorkerState, payload: GenerationPayload, control: JobControl,
              pipeline: Callable[[GenerationPayload, JobContext, WorkerState], GenerationResult]) -> GenerationResult:
    """A generation job: its checkpoint, LoRAs and always-on scripts, then `pipeline`; run again with a smaller
    residency when the device runs out of memory."""
    import torch

    from backend.core.errors import JobInterrupted
    from backend.engine.pipelines.common import JobContext

    loaded = _job_model(state, payload)
    model, policy = loaded.model, state.policy
    active = [loaded]  # the model the job runs with now: a script's generations may switch it (X/Y/Z plot)
    try:
        while True:
            if active[0] is not loaded:  # run again after a switch: from the job's own model
                policy.settle(active[0].model)
                active[0] = loaded = _job_model(state, payload)
                model = loaded.model
            ctx = JobContext(loaded=model, policy=policy, options=payload["options"], outputs_root=payload["data_dir"],
                             checkpoint=loaded.checkpoint, vae=loaded.vae, control=control,
                             sampling=payload.get("sampling"), postprocess=state.postprocess,
                             warnings=list(payload.get("warnings") or []) + list(loaded.notes),
                             styles=payload.get("styles") or {}, previews=state.previews,
                             interrogate=state.interrogate)
            if payload.get("second_checkpoints"):
                ctx.switch_model = _model_switcher(kind, state, payload, ctx, active)
            try:
                _activate_networks(payload, ctx, state)
                try:
                    maps = [] if kind == "img2img_batch" else _prepare_scripts(kind, payload, ctx, state)
                except JobInterrupted:  # the pipeline sees the flag too and returns at once, with no image
                    maps, ctx.sampling_hooks = [], []
                job_payload = _scripts_request(payload, ctx, state)
                _add_extension_callbacks(job_payload, ctx)
                result = (_run_script(kind, pipeline, job_payload, ctx, state, active) if payload.get("script")
                          else pipeline(job_payload, ctx, state))
                if ctx.a1111_scripts is not None:  # the AUTOMATIC1111 always-on scripts' postprocess
                    result = ctx.a1111_scripts.postprocess(result)
                break
            except torch.OutOfMemoryError:
                # Never fail for memory that a smaller residency would have had: step down and run again.
                del ctx
                policy.settle(active[0].model)
                torch.cuda.empty_cache()
                if not policy.degrade(active[0].model):
                    raise
    finally:
        policy.settle(active[0].model)
    result.info["sd_model_checkpoint"] = loaded.checkpoint.title
    result.extra_images = maps
    result.unloadable_checkpoints = loaded.unloadable
    return result


def _load_checkpoint(payload: GenerationPayload, state: WorkerState, limit: int):
    """The job's model: its checkpoint, or, when the checkpoint was chosen automatically (the user asked for none),
    the first of the candidates that loads. -> (model, checkpoint, vae, warnings, {path: why it did not load}).

    A checkpoint the user asked for is the only candidate: its load error is the job's error. Each automatic
    candidate that fails is named in a warning and the next one is tried; when none loads, the job fails with
    every reason."""
    import torch

    from backend.core.errors import UserError

    candidates = [(payload["checkpoint"], payload.get("vae"))] + list(payload.get("checkpoint_fallbacks") or [])
    parts = [f.path for f in payload.get("parts") or ()]  # "VAE / Text Encoder": they complete a FLUX.1 / SD3 file
    notes = list(payload.get("checkpoint_notes") or [])
    unloadable: dict[str, str] = {}
    for number, (ckpt, vae) in enumerate(candidates, 1):
        try:
            return state.cache.get(ckpt.path, limit, parts), ckpt, vae, notes, unloadable
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001  a broken file: the next candidate is tried
            if len(candidates) == 1:
                raise
            message = exc.message if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            log.error("checkpoint %s could not be loaded%s", ckpt.name,
                      f": {message}" if isinstance(exc, UserError) else f":\n{traceback.format_exc()}")
            unloadable[str(ckpt.path)] = message
            notes.append(f"Checkpoint {ckpt.name} could not be loaded and was skipped: {message}")
            if number == len(candidates):
                summary = "No checkpoint could be loaded. " + " ".join(notes)
                if isinstance(exc, UserError):
                    raise UserError(summary, status=exc.status) from exc
                raise RuntimeError(summary) from exc
    raise AssertionError("unreachable")


def _add_extension_callbacks(payload: GenerationPayload, ctx: JobContext) -> None:
    """The enabled extensions' script_callbacks that run in every job, as A1111 (`payload["a1111_callbacks"]`, the
    files the app found): on_cfg_denoiser after the always-on scripts' sampling hooks, on_before_image_saved /
    on_image_saved around each save (`backend.engine.a1111_callbacks`)."""
    if not payload.get("a1111_callbacks"):
        return
    from backend.engine.a1111_callbacks import JobCallbacks
    from backend.core.schemas import Img2ImgRequest

    callbacks = JobCallbacks(payload["a1111_callbacks"], ctx.options)
    ctx.extension_hooks = callbacks.sampling_hooks(ctx)
    ctx.sampling_hooks = list(ctx.sampling_hooks) + ctx.extension_hooks
    request = payload.get("request")
    ctx.image_save = callbacks.image_saving(ctx, request, isinstance(request, Img2ImgRequest))


def _scripts_request(payload: GenerationPayload, ctx: JobContext, state: WorkerState) -> GenerationPayload:
    """The payload with the request the job's AUTOMATIC1111 always-on scripts left (`p.prompt`, `p.steps`, ... set
    in their setup/before_process/process; checked there as the app checks a request); the prompts' LoRAs again
    when the scripts changed them."""
    scripts = ctx.a1111_scripts
    if scripts is None or scripts.request is payload["request"]:
        return payload
    before, request = payload["request"], scripts.request
    changed = dict(payload, request=request)
    if (request.prompt, request.negative_prompt) != (before.prompt, before.negative_prompt):
        _activate_networks(changed, ctx, state)
    return changed


def _activate_networks(payload: GenerationPayload, ctx: JobContext, state: WorkerState) -> None:
    """The prompt's <lora:...> tags into the model's weights (earlier ones taken out), their infotext hashes
    and warnings, and the embeddings the prompts may use (`backend.engine.networks.activation`)."""
    from backend.engine.networks.activation import activate_for_job
    activate_for_job(payload.get("request"), ctx, state.networks)


def _prepare_scripts(kind: str, payload: GenerationPayload, ctx: JobContext, state: WorkerState, init_image=None,
                     init_mask=None) -> list[bytes]:
    """Prepare the job's always-on scripts (`payload["scripts"]`, parsed by the app): their sampling hooks into
    `ctx.sampling_hooks`; returns the images they add after the job's (PNG).

    In img2img, `init_image`/`init_mask` are a folder batch's current file and mask (default: the request's first
    init image and its mask); scripts may use them."""
    scripts = payload.get("scripts")
    if not scripts:
        return []
    from backend.engine.always_on import prepare_scripts, script_job
    return prepare_scripts(scripts, script_job(kind, payload, init_image, init_mask), ctx, state.scripts)


def _cell_model_files(table: dict, settings: dict, job: JobModel) -> tuple[ModelFile, ModelFile | None]:
    """The checkpoint and VAE files a script's generation runs with: those the app resolved for its model settings
    (`payload["script"]["models"]`, keyed by the request's sd_model_checkpoint and sd_vae), else the job's own."""
    pairs = table.get((settings.get("sd_model_checkpoint"), settings.get("sd_vae")))
    if not pairs:
        return job.checkpoint, job.vae
    # no checkpoint chosen (a VAE axis) with an automatic checkpoint: the pair of the checkpoint the job loaded
    return next(((c, v) for c, v in pairs if c.path == job.checkpoint.path), pairs[0])


def _switch_model(kind: str, state: WorkerState, payload: GenerationPayload, ctx: JobContext, current: JobModel,
                  checkpoint: ModelFile, vae: ModelFile | None) -> JobModel:
    """Run the rest of the job with another checkpoint or VAE (an X/Y/Z cell's): taken from the model cache (its
    LRU order and limit hold as for any job) and placed by the device policy; the context's model, infotext files
    and always-on scripts' hooks (ControlNet, placed beside the new model) follow. The caller applies the LoRAs."""
    from backend.core.errors import JobInterrupted

    state.policy.settle(current.model)
    switched = _job_model(state, {**payload, "checkpoint": checkpoint, "vae": vae, "checkpoint_fallbacks": [],
                                  "checkpoint_notes": []})
    ctx.loaded, ctx.checkpoint, ctx.vae = switched.model, switched.checkpoint, switched.vae
    if payload.get("scripts") and kind != "img2img_batch":
        try:
            _prepare_scripts(kind, payload, ctx, state)  # its detected maps were added to the job's at the start
        except JobInterrupted:
            ctx.sampling_hooks = []
        ctx.sampling_hooks = list(ctx.sampling_hooks) + list(ctx.extension_hooks)  # the extensions' callbacks
    return switched


def _model_switcher(kind: str, state: WorkerState, payload: GenerationPayload, ctx: JobContext,
                    active: list[JobModel]) -> Callable[..., ModelFile]:
    """`ctx.switch_model(which, request)` for a job whose requests name a refiner or a hires. checkpoint (their files
    resolved by the app: `payload["second_checkpoints"]`, by name): "refiner" / "hires" switch the model the job
    samples with to the request's `refiner_checkpoint` / `hr_checkpoint_name` (through the model cache, placed by
    the device policy, the request's LoRAs and the always-on scripts' hooks prepared again for it); None (and "hires" without a hires. checkpoint) switches back to the
    generation's own. The context's checkpoint keeps naming the generation's own (the infotext's Model). -> the
    checkpoint now sampled with (with its sha256)."""
    home: list[JobModel | None] = [None]  # the generation's own model while another one samples
    away: list[JobModel | None] = [None]  # the one switched to

    def switch(which: str | None, request=None) -> ModelFile:
        from backend.core.second_checkpoints import hires_checkpoint_name, refiner_name

        request = request if request is not None else payload.get("request")
        name = (refiner_name(request) if which == "refiner" else hires_checkpoint_name(request) if which == "hires"
                else None)
        entry = payload["second_checkpoints"].get(name) if name is not None else None
        current = active[0]
        if home[0] is not None and current is not away[0]:  # a script switched the model since (X/Y/Z plot's cell)
            home[0] = None
        if entry is None:
            if home[0] is None:
                return current.checkpoint
            target, home[0] = home[0], None
            checkpoint, vae = target.checkpoint, target.vae
        else:
            checkpoint, vae = entry["checkpoint"], entry.get("vae")
        if (checkpoint.path, vae.path if vae else None) == \
                (current.checkpoint.path, current.vae.path if current.vae else None):
            return current.checkpoint
        if home[0] is None:
            home[0] = current
        named, named_vae = ctx.checkpoint, ctx.vae
        active[0] = away[0] = _switch_model(kind, state, payload, ctx, current, checkpoint, vae)
        ctx.checkpoint, ctx.vae = named, named_vae
        _activate_networks({**payload, "request": request}, ctx, state)
        return active[0].checkpoint

    return switch


_STALE = object()  # _run_script: hooks prepared for a model the job no longer runs


def _prepare_cell_scripts(kind: str, changed: GenerationPayload, ctx: JobContext, state: WorkerState) -> None:
    """A script's generation that runs with its own always-on scripts (`changed["scripts"]`, parsed by the app: an
    X/Y/Z cell of "[ControlNet] Weight"): their hooks replace the job's for it (their extra images are not kept:
    A1111's X/Y/Z keeps each cell's first image)."""
    from backend.core.errors import JobInterrupted
    from backend.engine.always_on import prepare_scripts, script_job
    try:
        prepare_scripts(changed.get("scripts") or {}, script_job(kind, changed), ctx, state.scripts)
    except JobInterrupted:  # the pipeline sees the flag too and returns at once
        ctx.sampling_hooks = []
    ctx.sampling_hooks = list(ctx.sampling_hooks) + list(ctx.extension_hooks)


def _run_script(kind: str, pipeline: Callable[[GenerationPayload, JobContext, WorkerState], GenerationResult],
                payload: GenerationPayload, ctx: JobContext, state: WorkerState,
                models: list[JobModel] | None = None) -> GenerationResult:
    """A selectable script's job (Prompt matrix, Loopback, X/Y/Z plot, ...): the script runs `pipeline` as often as
    it needs (`backend.engine.scripts`), each time with the LoRAs of its prompts and, when the app resolved model
    files for its generations' settings (X/Y/Z plot's Checkpoint name and VAE axes), with that checkpoint and VAE.
    `models[0]`: the job's model now (the caller's, updated on a switch)."""
    from backend.engine.scripts import run_script

    active = [(payload["request"].prompt, payload["request"].negative_prompt)]  # whose LoRAs are applied
    table = payload["script"].get("models") or {}
    models = models if models is not None else []
    job_model = models[0] if models else None
    prepared = [payload.get("scripts")]  # the always-on scripts whose hooks are in the context now

    def run_pipeline(changed: GenerationPayload) -> GenerationResult:
        from backend.core.job_options import JobOptions

        settings = changed["request"].override_settings or {}
        if table and job_model is not None:
            checkpoint, vae = _cell_model_files(table, settings, job_model)
            current = models[0]
            if (checkpoint.path, vae.path if vae else None) != \
                    (current.checkpoint.path, current.vae.path if current.vae else None):
                models[0] = _switch_model(kind, state, payload, ctx, current, checkpoint, vae)
                active[0] = None  # the LoRAs go onto the new model
                prepared[0] = payload.get("scripts") if payload.get("scripts") else _STALE  # the job's, if any
        if changed.get("scripts") is not prepared[0]:  # a cell with its own always-on scripts (X/Y/Z extension axis)
            _prepare_cell_scripts(kind, changed, ctx, state)
            prepared[0] = changed.get("scripts")
        prompts = (changed["request"].prompt, changed["request"].negative_prompt)
        if prompts != active[0]:
            _activate_networks(changed, ctx, state)
            active[0] = prompts
        # A derived request's own settings (an X/Y/Z cell's Clip skip, Eta, ...; checked by the app's settings
        # gate when the script was prepared) hold for its run; its checkpoint and VAE were switched above.
        overrides = {k: v for k, v in settings.items()
                     if k not in ("sd_model_checkpoint", "sd_vae")}
        job_options = ctx.options
        if overrides:
            ctx.options = JobOptions.of({**{k: job_options[k] for k in job_options}, **overrides})
        try:
            return pipeline(changed, ctx, state)
        finally:
            ctx.options = job_options

    return run_script(kind, payload, ctx, run_pipeline)


def _run_txt2img(payload: GenerationPayload, ctx: JobContext, state: WorkerState) -> GenerationResult:
    from backend.engine.pipelines import txt2img
    return txt2img.run(payload["request"], ctx, each=payload.get("each_image"),
                       firstpass_image=payload.get("firstpass_image"))


def _run_img2img(payload: GenerationPayload, ctx: JobContext, state: WorkerState) -> GenerationResult:
    from backend.engine.pipelines import img2img
    return img2img.run(payload["request"], ctx, payload["init_images"], payload["mask"],
                       color_from=payload.get("color_correction_from"), each=payload.get("each_image"))


def _run_img2img_batch(payload: GenerationPayload, ctx: JobContext, state: WorkerState) -> GenerationResult:
    from backend.engine.pipelines import img2img
    batch = payload["batch"]
    # Always-on scripts are prepared per file, so what uses the img2img image follows the folder.
    before_each = ((lambda image, mask: _prepare_scripts("img2img_batch", payload, ctx, state, init_image=image,
                                                         init_mask=mask))
                   if payload.get("scripts") else None)
    return img2img.run_batch(payload["request"], ctx, batch["input_dir"], batch["output_dir"], batch["mask_dir"],
                             before_each=before_each)


# Every job kind the app process sends (`BackendClient.submit(kind, payload)`) and the handler that runs it.
JOB_HANDLERS: Mapping[str, JobHandler] = MappingProxyType({
    "memory": _memory,
    "unload": _unload,
    "extras": _extras,
    "interrogate": _interrogate,
    "merge_checkpoints": _merge_checkpoints,
    "cache_info": _cache_info,
    "load": _load,
    "txt2img": _txt2img,
    "img2img": _img2img,
    "img2img_batch": _img2img_batch,
    **{kind: _script_job(kind) for kind in SCRIPT_JOBS},
})


def run_job(kind: str, payload: Any, state: WorkerState, control: JobControl) -> Any:
    """Run one job with the handler of its kind (`JOB_HANDLERS`); an unknown kind is an error naming the known ones."""
    handler = JOB_HANDLERS.get(kind)
    if handler is None and kind in SCRIPT_JOBS:  # a job kind of an extension in DATA_DIR/extensions
        handler = _script_job(kind)
    if handler is None:
        raise ValueError(f"unknown job kind {kind!r}; the backend runs: {', '.join(JOB_HANDLERS)}")
    return handler(state, payload, control)


def app_process_alive() -> bool:
    """Whether the app process that started this backend still runs."""
    import multiprocessing
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def next_message(jobs, parent_alive: Callable[[], bool], poll_seconds: float = 2.0):
    """The next message from the app (None: stop). Also None once the app process is gone, however it ended
    (killed, crashed): an orphaned backend would otherwise keep its models and the GPU's memory forever."""
    import queue
    while True:
        try:
            return jobs.get(timeout=poll_seconds)
        except queue.Empty:
            if not parent_alive():
                log.warning("the app process is gone; the backend stops")
                return None


def memory_report(device=None) -> dict:
    """RAM and CUDA memory in the shape of A1111's GET /sdapi/v1/memory.

    ram: free (available to new allocations), used (this backend process's resident set), total.
    cuda: system (driver free/used/total), and the allocator's active/allocated/reserved/inactive
    current and peak bytes, with its retry and out-of-memory counts; {"error": "unavailable"} without CUDA.
    """
    import psutil
    import torch

    vm = psutil.virtual_memory()
    proc = psutil.Process(os.getpid())
    ram = {"free": vm.available, "used": proc.memory_info().rss, "total": vm.total}
    cuda: dict = {"error": "unavailable"}
    if torch.cuda.is_available():
        dev = device if device is not None and getattr(device, "type", "") == "cuda" else torch.device("cuda")
        free, total = torch.cuda.mem_get_info(dev)
        stats = torch.cuda.memory_stats(dev)
        cuda = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0), "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0), "peak": stats.get("reserved_bytes.all.peak", 0)},
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0), "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    return {"ram": ram, "cuda": cuda}


def assign_device(args: argparse.Namespace) -> None:
    """This worker's device among the pool's (`--backend-workers`): worker `worker_index` of `worker_count` takes the
    `--device-id` list's entry of its index (`0,1`, round robin), else, with several CUDA devices visible, the device
    of its index; one worker and a single `--device-id` keep the flag as it is."""
    index, count = int(getattr(args, "worker_index", 0) or 0), int(getattr(args, "worker_count", 1) or 1)
    ids = [part.strip() for part in str(getattr(args, "device_id", "") or "").split(",") if part.strip()]
    if ids:
        args.device_id = ids[index % len(ids)]
        return
    import torch
    if count > 1 and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        args.device_id = str(index % torch.cuda.device_count())


def cpu_threads(worker_count: int) -> int:
    """torch threads of a CPU worker: the physical cores split between the pool's workers, at least one (torch
    defaults to one thread per logical CPU; SMT siblings only slow the matrix kernels down)."""
    import psutil
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, physical // max(1, worker_count))


def loaded_checkpoints(state: WorkerState) -> list[str]:
    """The paths of the checkpoints in the worker's cache, least recently used first (what the pool routes on)."""
    return [str(key[0]) for key in state.cache.models]


def build_state(args_dict: dict) -> WorkerState:
    """Everything a worker keeps from job to job, for the device `assign_device` chose (a backend process, a Ray
    actor)."""
    import torch

    from backend.checkpoints import HashCache
    from backend.engine.devices import DevicePolicy
    from backend.core.paths import DataPaths

    args = argparse.Namespace(**args_dict)
    assign_device(args)
    torch.set_grad_enabled(False)
    paths = DataPaths.from_args(args)
    policy = DevicePolicy.from_args(args)
    if policy.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = cpu_threads(int(getattr(args, "worker_count", 1) or 1))
        if torch.get_num_threads() > threads or int(getattr(args, "worker_count", 1) or 1) > 1:
            torch.set_num_threads(threads)
    hashes = HashCache(paths.cache_dir / "hashes.json")
    from backend.engine.always_on import add_extension_tables
    add_extension_tables(paths.data_dir)  # the engine parts of the extensions in DATA_DIR/extensions
    from backend.engine.networks.activation import NetworkRuntime
    from backend.engine.postprocess.runtime import PostprocessRuntime
    from backend.engine.interrogate.runtime import InterrogateRuntime
    from backend.engine.previews import PreviewDecoders
    return WorkerState(policy=policy, hashes=hashes, cache=ModelCache(policy, hashes, paths.models_dir), vae=VaeSwitcher(),
                       scripts=ScriptRuntimes(policy, paths.models_dir),
                       postprocess=PostprocessRuntime(paths, args), networks=NetworkRuntime.from_paths(paths),
                       previews=PreviewDecoders(paths.models_dir),
                       interrogate=InterrogateRuntime.from_args(paths, args))


def answer_job(msg: dict, state: WorkerState, control: JobControl) -> dict:
    """Run one job message ({job_id, kind, payload}) -> its `result` or `error` event, with the checkpoints then
    loaded (`checkpoints`)."""
    import torch

    from backend.core.errors import UserError

    job_id, kind, payload = msg["job_id"], msg["kind"], msg["payload"]
    if msg.get("entropy") is not None:
        # Python's `random` (random seeds: -1) from a value the app chose for this job, so that a job run again on
        # another worker after its first one died draws the same seeds and makes the same picture
        random.seed(msg["entropy"])
    try:
        result = run_job(kind, payload, state, control)
        event = {"type": "result", "job_id": job_id, "result": result}
    except UserError as exc:
        event = {"type": "error", "job_id": job_id, "message": exc.message, "status": exc.status}
    except Exception as exc:  # a bug or a resource problem: log it whole, report it short
        log.error("job %s (%s) failed:\n%s", job_id, kind, traceback.format_exc())
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            message = f"Out of memory while running {kind}: {exc}. Try a smaller size or batch, or --medvram/--lowvram."
        event = {"type": "error", "job_id": job_id, "message": message, "status": 500}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    event["checkpoints"] = loaded_checkpoints(state)
    return event


def worker_main(args_dict: dict, jobs, events, interrupt_flag, skip_flag) -> None:
    """Entry point of the backend process (one per `--backend-workers`)."""
    import signal
    # Ctrl+C in a terminal reaches the whole process group: the app process stops this one itself (service.stop()).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args_dict.get("loglevel", "INFO").upper(),
                        format="%(asctime)s backend %(levelname)s %(name)s: %(message)s")
    state = build_state(args_dict)
    flags = SharedFlags(interrupt_flag, skip_flag)
    log.info("backend ready (pid %d): %s", os.getpid(), state.policy.describe())
    events.put({"type": "ready", "pid": os.getpid(), "device": state.policy.describe(), "checkpoints": []})
    while True:
        msg = next_message(jobs, app_process_alive)
        if msg is None:
            break
        events.put(answer_job(msg, state, WorkerJobControl(msg["job_id"], events, flags)))
