"""`--compile`: the UNet's forward wrapped by torch.compile (CUDA graphs on the GPU)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def compile_unet(unet: torch.nn.Module, device: torch.device, eager: Callable) -> None:
    """`--compile`: replace the UNet's forward by torch.compile of `eager` (its uncompiled forward), one
    graph per shape (CUDA graphs on the GPU). The caller records what it compiled for (`LoadedModel`)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(eager, mode=mode, dynamic=False)

    def forward(*args, **kwargs):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    unet.forward = forward
    log.info("UNet compiled for %s (mode %s); the first run at each size takes longer", device, mode or "default")
