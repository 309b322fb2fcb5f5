"""What a loaded model is made of, as the device policy sees it, for every family.

- the text encoders: an SD model keeps them in a list (`SDModel.text_encoders`), FLUX.1 and SD3 in a dict keyed
  by part ("clip_l", "clip_g", "t5xxl", `FlowModel.text_encoders`); `encoder_modules` / `named_encoders` walk
  both, so no caller needs to know which;
- dtype casts that keep stored weights as they are: float8 tensors (a float8 T5, or float8 weights in plain
  `nn.Linear`s) and the uint8 bytes of `quantized.QuantizedLinear` (GGUF or float8) are never widened, the
  layers holding them cast to the compute dtype in their own forward; everything else floating goes to the
  policy's dtype (`cast_floating`);
- sizes as stored (`stored_bytes`): float8 one byte per weight, GGUF its blocks' bytes, the rest in the dtype it
  will have;
- T5-XXL's compute dtype: never float16, whose range its activations exceed (`t5_dtype`), and the float8 T5's
  per-block upcast hooks (`text_encoders.Float8Compute`) kept computing in it (`retarget_float8_compute`).
"""
from __future__ import annotations

import torch

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
T5_PART = "t5xxl"
FLOW_FAMILIES = ("flux", "sd3")


def is_flow(model) -> bool:
    """A FLUX.1 or SD3 model (a transformer as its `unet`, text encoders by part)."""
    return getattr(model, "family", "") in FLOW_FAMILIES


def encoder_modules(model) -> list[torch.nn.Module]:
    """The model's text encoders, whatever holds them (SD: a list; FLUX/SD3: a dict by part)."""
    return [module for _name, module in named_encoders(model)]


def named_encoders(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each text encoder: FLUX/SD3's part names ("clip_l", "clip_g", "t5xxl"); for an SD
    model's list, "te1", "te2" (the order of `SDModel.text_encoders`)."""
    encoders = getattr(model, "text_encoders", None) or []
    if isinstance(encoders, dict):
        return [(name, module) for name, module in encoders.items() if module is not None]
    return [(f"te{i + 1}", module) for i, module in enumerate(encoders) if module is not None]


def is_float8(t: torch.Tensor) -> bool:
    return t.dtype in FLOAT8_DTYPES


def _castable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not is_float8(t)


def cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `module`'s floating tensors to `dtype`, leaving float8 and integer (quantized bytes) tensors as they
    are. Goes through `Module._apply`, so modules with their own rules (QuantizedLinear keeps its float32 weight
    scale) still apply them."""
    module._apply(lambda t: t.to(dtype) if _castable(t) and t.dtype != dtype else t)


def stored_bytes(module: torch.nn.Module | None, dtype: torch.dtype | None = None) -> int:
    """Bytes `module` holds once cast to `dtype` by `cast_floating` (None: as it is now): float8 and quantized
    bytes at their stored size, other floating tensors at `dtype`'s."""
    if module is None:
        return 0
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = dtype.itemsize if (dtype is not None and _castable(t)) else t.element_size()
        total += t.numel() * size
    return total


def t5_dtype(text_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype T5 computes in when the other text encoders get `text_dtype` on `device`: float32 stays float32;
    else bfloat16 (as `text_encoders.t5_compute_dtype`), or float32 on a CUDA device without bfloat16. Never float16."""
    from backend.engine.families.text_encoders import t5_compute_dtype
    dtype = t5_compute_dtype(text_dtype)
    if dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        return torch.float32
    return dtype


def retarget_float8_compute(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Make the float8 upcast hooks (`Float8Compute`) inside `module` cast to `dtype`; -> how many there are."""
    from backend.engine.families.text_encoders import Float8Compute
    count = 0
    for m in module.modules():
        for hook in m._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Float8Compute):
                owner.dtype = dtype
                count += 1
    return count
