"""The engine side of always-on scripts (A1111's `alwayson_scripts`): each script's component that turns its
checked arguments into sampling hooks for the job.

The app process parses a request's `alwayson_scripts` through its registry (`backend.always_on_scripts`) and
sends the results as the payload's `scripts` ({name: parsed arguments}). Here `ENGINE_SCRIPTS` maps each name
to the module that prepares it: `prepare(args, job, ctx, resources) -> (hooks, images)`, where `job` is the
`ScriptJob` below, `ctx` the pipeline's `JobContext` (for warnings, infotext, the model and the device policy),
`resources` what the backend process keeps between jobs (caches), hooks are `SamplingHook`s and images are PNG
bytes shown after the job's pictures (A1111 scripts' extra images). Modules are imported on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from PIL import Image, ImageOps

from backend.core.request_checks import hires_size as hires_size_of

# Script name (lower case, as the request spells it) -> module with `prepare`.
ENGINE_SCRIPTS: dict[str, str] = {
    "controlnet": "backend.engine.controlnet.script",
}


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


def prepare_scripts(scripts: dict, job: ScriptJob, ctx, resources) -> list[bytes]:
    """Prepare every script of the job, in the request's order: their hooks become `ctx.sampling_hooks`;
    returns their images (PNG)."""
    hooks, images = [], []
    for name, args in scripts.items():
        module = ENGINE_SCRIPTS.get(name)
        if module is None:  # the app's registry and this one list the same names
            raise ValueError(f"always-on script {name!r} has no engine component")
        new_hooks, new_images = importlib.import_module(module).prepare(args, job, ctx, resources)
        hooks.extend(new_hooks)
        images.extend(new_images)
    ctx.sampling_hooks = hooks
    return images
