"""Attention kernels: A1111's `--xformers` / `--opt-*` flags mapped to a diffusers attention processor,
and putting that processor into every `Attention` of a UNet, VAE or ControlNet."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdp", "sdp-no-mem", "xformers", "split", "basic")


def attention_from_args(args) -> str:
    """A1111's attention flags -> one of ATTENTION_CHOICES (xformers only when it is installed)."""
    if getattr(args, "xformers", False) or getattr(args, "force_enable_xformers", False):
        if xformers_available():
            return "xformers"
        log.warning("--xformers: the xformers package is not installed; using PyTorch SDPA attention")
    if getattr(args, "opt_sdp_no_mem_attention", False):
        return "sdp-no-mem"
    if getattr(args, "opt_sdp_attention", False):
        return "sdp"
    if getattr(args, "opt_sub_quad_attention", False) or getattr(args, "opt_split_attention", False):
        return "split"
    if getattr(args, "disable_opt_split_attention", False):
        return "basic"
    return "sdp"


def xformers_available() -> bool:
    import importlib.util
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a broken build
        return False


class SdpNoMemAttnProcessor:
    """PyTorch SDPA without the memory-efficient kernel (`--opt-sdp-no-mem-attention`: deterministic)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0
        self.inner = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
            return self.inner(*args, **kwargs)


def attention_processor(kind: str):
    from diffusers.models import attention_processor as ap
    if kind == "xformers":
        return ap.XFormersAttnProcessor()
    if kind == "split":
        return ap.SlicedAttnProcessor(slice_size=2)
    if kind == "basic":
        return ap.AttnProcessor()
    if kind == "sdp-no-mem":
        return SdpNoMemAttnProcessor()
    return ap.AttnProcessor2_0()


def configure_attention(module: torch.nn.Module, kind: str) -> None:
    """Give every diffusers `Attention` in `module` the processor for `kind` (those that have one of its type keep it)."""
    from diffusers.models.attention_processor import Attention
    processor = attention_processor(kind)
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) is not type(processor):
            m.set_processor(processor)
