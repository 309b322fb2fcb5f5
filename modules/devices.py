"""AUTOMATIC1111's `modules.devices`: the running job's device and dtypes (`device`, `dtype`, `dtype_vae`,
`dtype_unet`, `get_optimal_device()`), `cpu`, `torch_gc()`, `autocast()`, `has_mps()`. torch is imported when a
script first uses one of them, never when the module is imported (the app process imports script files for their
`ui()` and holds no torch)."""
from __future__ import annotations

import contextlib
import gc

from modules.context import current, missing

__all__ = ["get_optimal_device", "get_optimal_device_name", "torch_gc", "autocast", "has_mps", "without_autocast"]
# read when asked for (module __getattr__): torch is imported then, and the job's device is known only in a job
PROVIDED = (*__all__, "cpu", "device", "dtype", "dtype_vae", "dtype_unet", "device_interrogate", "device_gfpgan",
            "device_esrgan", "device_codeformer")

_JOB_DEVICE = ("device", "device_interrogate", "device_gfpgan", "device_esrgan", "device_codeformer")


def _job(what: str):
    context = current(f"modules.devices.{what}")
    if context.device is None:
        raise RuntimeError(f"modules.devices.{what} is only available while a job runs the script (Easel's app "
                           "process holds no model).")
    return context


def get_optimal_device():
    return _job("get_optimal_device").device


def get_optimal_device_name() -> str:
    return str(get_optimal_device())


def has_mps() -> bool:
    import torch
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def torch_gc() -> None:
    """Free what Python and the accelerator's allocator hold (only when the process already uses torch)."""
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    if has_mps() and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def autocast(disable: bool = False):
    """Mixed precision for the job's half dtype on CUDA, as A1111; a no-op on the CPU or in float32."""
    import torch

    context = _job("autocast")
    if disable or context.dtype == torch.float32 or torch.device(context.device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=context.dtype)


def without_autocast(disable: bool = False):
    import torch
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable \
        else contextlib.nullcontext()


def __getattr__(name: str):
    if name == "cpu":
        import torch
        return torch.device("cpu")
    if name in _JOB_DEVICE:
        return _job(name).device
    if name in ("dtype", "dtype_unet"):
        return _job(name).dtype
    if name == "dtype_vae":
        context = _job(name)
        return context.dtype_vae if context.dtype_vae is not None else context.dtype
    raise missing(__name__, name)
