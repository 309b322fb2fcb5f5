"""LoRAs on quantized weights, added at compute time instead of merged.

A weight stored quantized (float8, or GGUF/float8 in the FLUX loader's `QuantizedLinear`) cannot take a
LoRA's update in place without losing it to the rounding (and a float8 -> bf16 -> float8 round trip is not
exact), so the LoRA runs beside it: a forward hook on the module adds

    y += x @ (multiplier * up @ down)^T        as  (x @ down^T) @ up^T, for a plain LoRA (low rank, cheap),
    y += x @ delta^T (+ bias delta)            for the other module types (LoHa, LoKr, full, ...),

where up/down (or delta) are the module's rows of the update (a fused FLUX/SD3 layer's rows, see
`flow_targets`). The stored weights are never touched; removing the hooks (`NetworkPatcher.restore`)
leaves the module exactly as it was. The terms are kept in float32 and converted once per device/dtype the
module runs in (a streamed, offloaded module runs on the GPU with its weights kept in RAM).

A quantized linear is recognized by what it does, not its class: an `nn.Linear` whose weight is float8, or a
module with `in_features`, `out_features` and a `dequantized_weight(dtype)` method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                      if hasattr(torch, n))


def _dequantizes(module: torch.nn.Module) -> bool:
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantized_weight", None)))


def stored_quantized(module: torch.nn.Module) -> bool:
    """Whether this module is a linear layer whose weight is stored quantized (LoRAs go in at compute time):
    one that dequantizes its weight itself, or an nn.Linear whose weight is float8 (or not floating point)."""
    if _dequantizes(module):
        return True
    if isinstance(module, torch.nn.Linear):
        weight = module.weight
        return weight is not None and (weight.dtype in FLOAT8_DTYPES or not weight.dtype.is_floating_point)
    return False


def weight_shape(module: torch.nn.Module) -> tuple[int, ...]:
    if _dequantizes(module):
        return (int(module.out_features), int(module.in_features))
    return tuple(module.weight.shape)


def module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters(recurse=False):
        return tensor.device
    for tensor in module.buffers(recurse=False):
        return tensor.device
    weight = getattr(module, "weight", None)  # a tensor subclass kept as a plain attribute
    return getattr(weight, "device", torch.device("cpu"))


def float32_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight in float32 (dequantized for a quantized one): a new tensor or the weight itself."""
    if _dequantizes(module):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().to(torch.float32)


class LoraTerm:
    """One network's addition to one module's output: a low-rank pair (up [out, r], down [r, in]) or a
    full weight delta [out, in] (with an optional bias delta [out]), the multiplier folded in, float32."""

    def __init__(self, *, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
                 delta: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        self.tensors = tuple(t.contiguous() if t is not None else None for t in (up, down, delta, bias))
        self._converted: dict[tuple, tuple] = {}

    def _as(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        found = self._converted.get(key)
        if found is None:
            found = tuple(t.to(device=device, dtype=dtype) if t is not None else None for t in self.tensors)
            self._converted[key] = found
        return found

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        up, down, delta, bias = self._as(x.device, x.dtype)
        if delta is not None:
            out = F.linear(x, delta, bias)
        else:
            out = F.linear(F.linear(x, down), up)
            if bias is not None:
                out = out + bias
        return out


class ComputeTimeLora:
    """The forward hook of one module: its output plus every term's."""

    def __init__(self):
        self.terms: list[LoraTerm] = []

    def __call__(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        extra = None
        for term in self.terms:
            y = term(x)
            extra = y if extra is None else extra + y
        if extra is None:
            return output
        return output + extra.to(output.dtype)


def install(terms: dict[int, tuple[torch.nn.Module, list[LoraTerm]]]) -> list:
    """Hook every module's terms in; the handles, to remove them exactly."""
    handles = []
    for module, module_terms in terms.values():
        hook = ComputeTimeLora()
        hook.terms.extend(module_terms)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles
