"""The engine side of always-on scripts (A1111's `alwayson_scripts`): each script's component that turns its
checked arguments into sampling hooks for the job.

The app process parses a request's `alwayson_scripts` through its registry (`backend.always_on_scripts`) and
sends the results as the payload's `scripts` ({name: parsed arguments}). Here `ENGINE_SCRIPTS` maps each name
to the module that prepares it: `prepare(args, job, ctx, runtime) -> (hooks, images)`, where `job` is the
`ScriptJob` below, `ctx` the pipeline's `JobContext` (for warnings, infotext, the model and the device policy),
`runtime` what the script keeps in the backend process between jobs (made by the module's `runtime(policy,
models_dir)`, held in `ScriptRuntimes`), hooks are `SamplingHook`s and images are PNG bytes shown after the job's
pictures (A1111 scripts' extra images). A script may also add job kinds of its own to the worker (`SCRIPT_JOBS`).
Modules are imported on first use.

Both tables come from the extensions' `easel_extension.py` files (docs/extensions.md), read here again rather than
sent by the app: the program's extension folders when this module is imported (so the worker's job table has the
built-in extensions' job kinds), `DATA_DIR/extensions` when the backend process starts (`add_extension_tables`).
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from backend.core.native_extensions import engine_tables
from backend.core.request_checks import hires_size as hires_size_of

# Script name (lower case, as the request spells it) -> module with `prepare` (and, when it keeps caches between
# jobs, `runtime(policy, models_dir)` that makes them). Job kinds a script adds to the worker's table (the app
# submits them for the script's own API routes and UI buttons): kind -> (script name, name of the module's function
# called with the payload and the script's runtime).
ENGINE_SCRIPTS, SCRIPT_JOBS = engine_tables(None)

# An extension's AlwaysVisible AUTOMATIC1111 script (its entry is a `modules.script_loading.ScriptCall`).
A1111_ALWAYS_ON = "backend.engine.a1111_always_on"



def add_extension_tables(data_dir) -> None:
    """At the backend process's start: the engine parts of the extensions in `DATA_DIR/extensions` too."""
    scripts, jobs = engine_tables(data_dir)
    for name, module in scripts.items():
        ENGINE_SCRIPTS.setdefault(name, module)
    for kind, target in jobs.items():
        SCRIPT_JOBS.setdefault(kind, target)


def _module(name: str):
    module = ENGINE_SCRIPTS.get(name)
    if module is None:  # the app's registry and this one list the same names
        raise ValueError(f"always-on script {name!r} has no engine component")
    if module.endswith(".py"):  # a file in an extension's folder (not on the import path)
        return _file_module(module)
    return importlib.import_module(module)


def _file_module(path: str):
    import importlib.util
    import sys

    key = "easel_engine_part_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


class ScriptRuntimes:
    """What the scripts' engine components keep in the backend process between jobs (loaded models, caches),
    one runtime per script, made on first use by its module's `runtime(policy, models_dir)`."""

    def __init__(self, policy, models_dir: Path):
        self.policy = policy
        self.models_dir = Path(models_dir)
        self._runtimes: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The script's runtime (None for a script that keeps nothing)."""
        if name not in self._runtimes:
            make = getattr(_module(name), "runtime", None)
            self._runtimes[name] = make(self.policy, self.models_dir) if make is not None else None
        return self._runtimes[name]

    def clear(self) -> None:
        """Release what the runtimes hold (the worker's `unload` job)."""
        for runtime in self._runtimes.values():
            if runtime is not None and hasattr(runtime, "clear"):
                runtime.clear()


def run_script_job(kind: str, payload: dict, runtimes: ScriptRuntimes) -> Any:
    """A job kind of `SCRIPT_JOBS`: the script's function with the payload and the script's runtime."""
    name, function = SCRIPT_JOBS[kind]
    return getattr(_module(name), function)(payload, runtimes.get(name))


@dataclass(frozen=True)
class ScriptJob:
    """What a script may need to know about the job it prepares for."""

    kind: str  # "txt2img", "img2img" or "img2img_batch"
    request: object  # the Txt2ImgRequest / Img2ImgRequest
    width: int
    height: int
    hires_size: tuple[int, int] | None  # txt2img with hires. fix: the second pass's size
    init_image: Image.Image | None  # img2img: the picture (a folder batch's current file)
    init_mask: Image.Image | None  # img2img: the inpaint mask, white = repaint ("Inpaint not masked" applied)
    seed: int


def script_job(kind: str, payload: dict, init_image=None, init_mask=None) -> ScriptJob:
    """The ScriptJob of a job's payload. img2img's picture and mask default to the request's first init image and
    its mask; a folder batch passes each file's."""
    req = payload["request"]
    hires = hires_size_of(req) if kind == "txt2img" and req.enable_hr else None
    if init_image is None and kind == "img2img":
        init_image = (payload.get("init_images") or [None])[0]
        init_mask = payload.get("mask")
    if init_mask is not None and getattr(req, "inpainting_mask_invert", 0):
        init_mask = ImageOps.invert(init_mask.convert("L"))
    return ScriptJob(kind=kind, request=req, width=req.width, height=req.height, hires_size=hires,
                     init_image=init_image, init_mask=init_mask, seed=max(0, int(req.seed)))


def prepare_scripts(scripts: dict, job: ScriptJob, ctx, runtimes: ScriptRuntimes) -> list[bytes]:
    """Prepare every script of the job, in the request's order: their hooks become `ctx.sampling_hooks`;
    returns their images (PNG). Each script's `prepare(args, job, ctx, runtime)` gets its own runtime."""
    from modules.script_loading import ScriptCall

    params = getattr(ctx, "extra_params", None)  # the job's infotext entries (JobContext)
    if params is not None:  # prepared again (an X/Y/Z cell's own scripts): the last preparation's entries go
        for key in getattr(ctx, "script_params", ()):
            params.pop(key, None)
        before = set(params)
    hooks, images = [], []
    a1111 = [args for args in scripts.values() if isinstance(args, ScriptCall)]
    ctx.a1111_scripts = None
    for name, args in scripts.items():
        if isinstance(args, ScriptCall):  # extensions' AlwaysVisible A1111 scripts (modules/): keep nothing
            if args is not a1111[0]:
                continue  # prepared together with the first, on one `p` (as A1111)
            new_hooks, new_images = importlib.import_module(A1111_ALWAYS_ON).prepare(a1111, job, ctx, None)
        else:
            new_hooks, new_images = _module(name).prepare(args, job, ctx, runtimes.get(name))
        hooks.extend(new_hooks)
        images.extend(new_images)
    ctx.sampling_hooks = hooks
    if params is not None:
        ctx.script_params = set(params) - before
    return images
