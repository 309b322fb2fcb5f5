"""`--compile`: the UNet's forward wrapped by torch.compile (CUDA graphs on the GPU)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """`--compile`: torch.compile the UNet's forward, one graph per shape (CUDA graphs on the GPU)."""
    if getattr(unet, "_easel_compiled", None) == device.type:
        return
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    eager = getattr(unet, "_easel_eager_forward", None) or unet.forward
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(eager, mode=mode, dynamic=False)

    def forward(*args, **kwargs):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    unet._easel_eager_forward = eager
    unet.forward = forward
    unet._easel_compiled = device.type
    log.info("UNet compiled for %s (mode %s); the first run at each size takes longer", device, mode or "default")

