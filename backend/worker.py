"""The backend process: owns torch and the device, runs one job at a time.

It talks to the app process through two queues (jobs in, events out) and two
shared flags (interrupt, skip). Events: `ready`, `progress`, `result`, `error`.
Loaded checkpoints stay in a least-recently-used cache (the active one on the
device, the others in RAM), so switching back to a cached one reads no file.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from collections import OrderedDict
from pathlib import Path

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
    """LRU cache of loaded checkpoints; the most recent is placed on the device, the others wait in RAM."""

    def __init__(self, policy, hashes):
        self.policy = policy
        self.hashes = hashes
        self.models: OrderedDict[tuple, object] = OrderedDict()
        self.loads = 0

    def get(self, path: Path, limit: int):
        from .model_loader import load_sd_model

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        if key in self.models:
            self.models.move_to_end(key)
            model = self.models[key]
        else:
            t0 = time.perf_counter()
            model = load_sd_model(path, dtype=self.policy.dtype, device="cpu")
            self.loads += 1
            log.info("loaded %s (%s) in %.1f s", path.name, model.family, time.perf_counter() - t0)
            self.models[key] = model
        for other_key, other in self.models.items():
            if other_key != key and getattr(other, "_easel_placed", None):
                self.policy.release(other)
        self.policy.place(model)
        while len(self.models) > max(1, limit):
            old_key, old = self.models.popitem(last=False)
            self.policy.release(old)
            del old
            log.info("evicted %s from the checkpoint cache", Path(old_key[0]).name)
        import gc
        gc.collect()
        return model

    def clear(self) -> None:
        self.models.clear()
        import gc
        gc.collect()


class VaeSwitcher:
    """Applies the chosen VAE file to a model, keeping the checkpoint's own VAE to restore later."""

    def __init__(self):
        self.files: dict[str, dict] = {}

    def apply(self, model, vae_path: str | None) -> None:
        from .model_loader import apply_vae_state_dict, load_vae_file

        current = getattr(model, "_easel_vae", None)
        if current == vae_path:
            return
        if not hasattr(model, "_easel_own_vae"):
            model._easel_own_vae = {k: v.detach().to("cpu", copy=True) for k, v in model.vae.state_dict().items()}
        if vae_path is None:
            apply_vae_state_dict(model, model._easel_own_vae)
        else:
            if vae_path not in self.files:
                self.files = {vae_path: load_vae_file(Path(vae_path))}
            apply_vae_state_dict(model, self.files[vae_path])
        model._easel_vae = vae_path


def _run_job(kind: str, payload: dict, state: dict, control: WorkerJobControl):
    from .checkpoints import ModelFile
    from .pipelines.common import JobContext

    if kind == "memory":
        return memory_report()
    if kind == "unload":
        state["cache"].clear()
        state["controlnets"].clear()
        return {"ok": True}
    if kind == "controlnet_detect":
        from .controlnet.service import run_detect_job
        return run_detect_job(payload, state["annotators"])
    if kind == "cache_info":
        return {"loads": state["cache"].loads, "cached": [Path(k[0]).name for k in state["cache"].models]}
    if kind not in ("txt2img", "img2img", "img2img_batch", "load"):
        raise ValueError(f"unknown job kind {kind!r}")

    ckpt: ModelFile = payload["checkpoint"]
    ckpt = ModelFile(name=ckpt.name, path=ckpt.path, sha256=ckpt.sha256 or state["hashes"].sha256(ckpt.path))
    vae = payload.get("vae")
    if vae is not None:
        vae = ModelFile(name=vae.name, path=vae.path, sha256=vae.sha256 or state["hashes"].sha256(vae.path))
    options = payload["options"]
    model = state["cache"].get(ckpt.path, int(options.get("sd_checkpoints_limit", 2)))
    state["vae"].apply(model, str(vae.path) if vae else None)
    if kind == "load":
        return {"loaded": ckpt.title, "family": model.family, "vae": vae.name if vae else None}
    ctx = JobContext(model=model, policy=state["policy"], options=options, outputs_root=payload["data_dir"],
                     checkpoint=ckpt, vae=vae, control=control)
    maps = _prepare_controlnet(kind, payload, ctx, state)
    result = _run_pipeline(kind, payload, ctx)
    result.info["sd_model_checkpoint"] = ckpt.title
    result.detected_maps = maps
    return result


def _prepare_controlnet(kind: str, payload: dict, ctx, state) -> list[bytes]:
    """Load and preprocess the job's ControlNet units into `ctx.controls`; returns the detected maps (PNG)."""
    units = payload.get("controlnet")
    if not units:
        return []
    from .controlnet.runtime import prepare_controls
    req = payload["request"]
    hires = None
    if kind == "txt2img" and req.enable_hr:
        from .pipelines.txt2img import hires_size
        hires = hires_size(req)
    init = (payload.get("init_images") or [None])[0] if kind == "img2img" else None
    ctx.controls, maps = prepare_controls(units, ctx, state["controlnets"], width=req.width, height=req.height,
                                          hires_size=hires, init_image=init, seed=max(0, int(req.seed)),
                                          annotator_env=state["annotators"])
    return maps


def _run_pipeline(kind: str, payload: dict, ctx):
    if kind == "txt2img":
        from .pipelines import txt2img
        return txt2img.run(payload["request"], ctx)
    from .pipelines import img2img
    if kind == "img2img_batch":
        batch = payload["batch"]
        return img2img.run_batch(payload["request"], ctx, batch["input_dir"], batch["output_dir"], batch["mask_dir"])
    return img2img.run(payload["request"], ctx, payload["init_images"], payload["mask"])


def memory_report() -> dict:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    proc = psutil.Process(os.getpid())
    ram = {"free": vm.available, "used": proc.memory_info().rss, "total": vm.total}
    cuda: dict = {"error": "no CUDA device"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        cuda = {
            "system": {"free": free, "used": total - free, "total": total},
            "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0), "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0), "peak": stats.get("reserved_bytes.all.peak", 0)},
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0), "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    return {"ram": ram, "cuda": cuda}


def worker_main(args_dict: dict, jobs, events, interrupt_flag, skip_flag) -> None:
    """Entry point of the backend process."""
    logging.basicConfig(level=args_dict.get("loglevel", "INFO").upper(),
                        format="%(asctime)s backend %(levelname)s %(name)s: %(message)s")
    import torch

    from .checkpoints import HashCache
    from .devices import DevicePolicy
    from .errors import UserError
    from .paths import DataPaths

    args = argparse.Namespace(**args_dict)
    torch.set_grad_enabled(False)
    paths = DataPaths.from_args(args)
    policy = DevicePolicy.from_args(args)
    hashes = HashCache(paths.cache_dir / "hashes.json")
    from .controlnet.annotators import AnnotatorEnv
    from .controlnet.runtime import ControlNetCache
    state = {"policy": policy, "hashes": hashes, "cache": ModelCache(policy, hashes), "vae": VaeSwitcher(),
             "controlnets": ControlNetCache(policy),
             "annotators": AnnotatorEnv(paths.models_dir / "ControlNet-annotators", device=str(policy.device))}
    flags = SharedFlags(interrupt_flag, skip_flag)
    log.info("backend ready (pid %d): %s", os.getpid(), policy.describe())
    events.put({"type": "ready", "pid": os.getpid(), "device": policy.describe()})
    while True:
        msg = jobs.get()
        if msg is None:
            break
        job_id, kind, payload = msg["job_id"], msg["kind"], msg["payload"]
        control = WorkerJobControl(job_id, events, flags)
        try:
            result = _run_job(kind, payload, state, control)
            events.put({"type": "result", "job_id": job_id, "result": result})
        except UserError as exc:
            events.put({"type": "error", "job_id": job_id, "message": exc.message, "status": exc.status})
        except Exception as exc:  # a bug or a resource problem: log it whole, report it short
            log.error("job %s (%s) failed:\n%s", job_id, kind, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
                message = f"Out of memory while running {kind}: {exc}. Try a smaller size or batch, or --medvram/--lowvram."
            events.put({"type": "error", "job_id": job_id, "message": message, "status": 500})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
