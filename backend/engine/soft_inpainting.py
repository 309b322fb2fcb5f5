"""Soft inpainting as an always-on script of the engine (the built-in extension `extensions-builtin/soft-inpainting`):
its job hook makes img2img's inpainting use `SoftInpainting` instead of the hard latent mask."""
from __future__ import annotations

from backend.engine.pipelines.img2img import SoftInpaintingMask
from backend.engine.sampling_hooks import SamplingHook


def prepare(enabled: bool, job, ctx, runtime) -> tuple[list[SamplingHook], list[bytes]]:
    return [SoftInpaintingMask()], []
