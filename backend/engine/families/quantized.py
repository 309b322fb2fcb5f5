"""Quantized weights: GGUF files, float8 tensors, and linear layers that compute with them.

Community FLUX/SD3 files come quantized to fit 8-12 GB cards:

- GGUF (city96's conversions, `flux1-dev-Q4_K_S.gguf`): read with the `gguf` package. F32/F16/BF16
  tensors become plain tensors; quantized ones stay quantized as `GGUFWeight` (raw blocks + type +
  logical shape in torch order; GGUF stores shapes fastest-dimension first, the reader reverses them).
  Quantization blocks run along the last (input) dimension, so a weight's rows are independent and
  can be split (a fused qkv into q, k, v) without dequantizing.
- float8 (`float8_e4m3fn` / `float8_e5m2`, `flux1-dev-fp8.safetensors`): kept in one byte per weight.
  ComfyUI's "scaled" float8 files (`t5xxl_fp8_e4m3fn_scaled.safetensors`, a `scaled_fp8` marker tensor)
  store a per-weight factor `<module>.scale_weight` (and `.scale_input`, used only by fp8 matmul kernels):
  the weight is `float8 value * scale_weight`.
- bitsandbytes NF4 (`flux1-dev-bnb-nf4-v2.safetensors`, Forge's): 4-bit codes, two per byte, into a 16-value code
  book, one float32 scale (absmax) per block of 64 values, the scales themselves stored as 8-bit codes with a
  nested scale per 256 of them and an offset (bitsandbytes' "compress_statistics"). Read as `NF4Weight` and
  dequantized here, in torch, on any device: no bitsandbytes and no CUDA needed. bitsandbytes FP4 files are
  refused with a message (`nf4_message`) pointing at GGUF Q4 or fp8 files instead.

`QuantizedLinear` holds such a weight (as uint8 bytes, so `module.to(dtype)` never widens it) and
dequantizes it to the input's dtype in each forward; `quantize_linears` swaps a module's `nn.Linear`s
for it where the state dict's weight is quantized; `load_quantized_weights` assigns a whole state dict
(quantized or not) to a module built on the meta device.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from backend.core.errors import UserError

log = logging.getLogger(__name__)

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor of scaled float8 files
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
NF4_HINT = ("Use a GGUF-quantized file (e.g. flux1-dev-Q4_K_S.gguf) or a float8 file "
            "(e.g. flux1-dev-fp8.safetensors) instead.")


# -- GGUF -----------------------------------------------------------------------------------------
def _dequantize_functions() -> dict:
    from diffusers.quantizers.gguf.utils import dequantize_functions
    return dequantize_functions


_DEQUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_ONLY_TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K")  # value = scale * integer, no minimum


class GGUFWeight:
    """A GGUF-quantized tensor: `raw` uint8 blocks shaped (*shape[:-1], bytes per row), its GGML type, and
    its logical `shape` (torch order). Row slices and row concatenations stay quantized."""

    __slots__ = ("raw", "qtype", "shape")

    def __init__(self, raw: torch.Tensor, qtype, shape):
        import gguf
        self.qtype = gguf.GGMLQuantizationType(int(qtype))
        self.shape = torch.Size(shape)
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        if not self.shape or self.shape[-1] % block_size:
            raise UserError(f"A {self.qtype.name} tensor of shape {tuple(self.shape)} is not made of whole "
                            f"{block_size}-value blocks: the GGUF file is damaged.")
        row_bytes = self.shape[-1] // block_size * type_size
        self.raw = raw.view(torch.uint8).reshape(*self.shape[:-1], row_bytes)

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> "GGUFWeight":
        return GGUFWeight(self.raw.to(device), self.qtype, self.shape)

    @property
    def splits_by_rows(self) -> bool:
        """Its blocks run along the last dimension: whole rows of a 2-D (or more) weight."""
        return self.ndim > 1

    def rows(self, start: int, stop: int) -> "GGUFWeight":
        """Rows `start:stop` of the first dimension, still quantized."""
        return GGUFWeight(self.raw[start:stop], self.qtype, (stop - start, *self.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import gguf
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        blocks = self.raw.reshape(-1, type_size)
        fn = _dequantize_functions().get(self.qtype)
        if fn is not None:
            # scale-only types are computed in the target dtype (about 2x faster on a CPU, within one or two of its
            # roundings); types with a subtracted minimum in float32, where cancellation would magnify rounding
            in_dtype = dtype in _DEQUANT_DTYPES and self.qtype.name in _SCALE_ONLY_TYPES
            values = fn(blocks, block_size, type_size, dtype if in_dtype else torch.float32)
        else:  # a type only gguf's numpy code knows: slow, but correct
            values = torch.from_numpy(gguf.quants.dequantize(blocks.cpu().numpy(), self.qtype)).to(blocks.device)
        return values.reshape(self.shape).to(dtype)

    def __repr__(self) -> str:
        return f"GGUFWeight({self.qtype.name}, shape={tuple(self.shape)}, device={self.device})"


def cat_rows(parts: list) -> "GGUFWeight | torch.Tensor":
    """Concatenate along the first dimension: GGUF weights (of one type) stay quantized, float8 stays float8."""
    if isinstance(parts[0], NF4Weight):
        return NF4Weight.cat_rows(parts)
    if isinstance(parts[0], GGUFWeight):
        if len({p.qtype for p in parts}) != 1:
            raise UserError("A fused GGUF weight mixes quantization types: the file is damaged.")
        raw = torch.cat([p.raw for p in parts], dim=0)
        return GGUFWeight(raw, parts[0].qtype, (raw.shape[0], *parts[0].shape[1:]))
    if parts[0].dtype in FLOAT8_DTYPES:
        return torch.cat([p.view(torch.uint8) for p in parts], dim=0).view(parts[0].dtype)
    return torch.cat(parts, dim=0)


def split_rows(t, sizes: list[int]) -> list:
    """Split a weight (tensor or GGUFWeight) along its first dimension into pieces of `sizes` rows."""
    if sum(sizes) != t.shape[0]:
        raise UserError(f"A fused weight has {t.shape[0]} rows where {sum(sizes)} were expected: "
                        "the file is damaged or of an unsupported variant.")
    if isinstance(t, BLOCK_WEIGHTS) and not t.splits_by_rows:
        t = t.dequantize(torch.float32)  # its blocks do not end with the rows
    out, start = [], 0
    for n in sizes:
        out.append(t.rows(start, start + n) if isinstance(t, BLOCK_WEIGHTS) else t[start:start + n])
        start += n
    return out


def read_gguf(path: Path) -> dict:
    """All tensors of a GGUF file by name: F32/F16/BF16 (and integer) ones as plain CPU tensors, quantized
    ones as `GGUFWeight`. Types neither diffusers nor gguf can dequantize give a `UserError`."""
    import gguf
    import numpy as np
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise UserError(f"{path.name} is not a readable GGUF file ({type(e).__name__}: {e}). "
                        "The file may be truncated or damaged.") from e
    T = gguf.GGMLQuantizationType
    plain = {T.F32: torch.float32, T.F16: torch.float16, T.F64: torch.float64, T.I8: torch.int8,
             T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64}
    supported = set(_dequantize_functions())
    tensors: dict = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.array(t.data)  # a private copy: the reader's arrays are views of a read-only file mapping
        qtype = T(int(t.tensor_type))
        if qtype in plain:
            tensors[t.name] = torch.from_numpy(data).reshape(shape)
        elif qtype == T.BF16:
            tensors[t.name] = torch.from_numpy(data).view(torch.bfloat16).reshape(shape)
        elif qtype in supported or qtype in gguf.quants._type_traits:
            if qtype not in supported:
                log.info("%s: %s is dequantized with gguf's numpy code (slow)", path.name, qtype.name)
            tensors[t.name] = GGUFWeight(torch.from_numpy(data), qtype, shape)
        else:
            raise UserError(f"{path.name} holds tensors quantized as {qtype.name}, which Easel cannot "
                            "dequantize. Use a file quantized as Q8_0, Q6_K, Q5_K, Q4_K, Q4_0 or similar.")
    return tensors


# -- float8 / quantized linear layers --------------------------------------------------------------
def is_quantized(t) -> bool:
    """A GGUF or NF4 weight or a float8 tensor (weights that `QuantizedLinear` keeps in their stored form)."""
    return isinstance(t, BLOCK_WEIGHTS) or (isinstance(t, torch.Tensor) and t.dtype in FLOAT8_DTYPES)


def dequantize(t, dtype: torch.dtype) -> torch.Tensor:
    """Any weight as a plain `dtype` tensor."""
    if isinstance(t, BLOCK_WEIGHTS):
        return t.dequantize(dtype)
    return t.to(dtype)


class QuantizedLinear(nn.Module):
    """`nn.Linear` whose weight stays in its stored form (GGUF blocks or float8, one byte or less per value)
    and is dequantized to the input's dtype in each forward. The stored bytes are the uint8 buffer
    `qweight`, so moving the module (`.to(device)`, `.to(dtype)`) never widens them; the bias is an
    ordinary parameter."""

    def __init__(self, weight, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise UserError(f"A quantized linear weight must have 2 dimensions, not shape {tuple(weight.shape)}.")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.register_buffer("nf4_absmax", None)  # NF4's float32 scales and code book (see _apply)
        self.register_buffer("nf4_code", None)
        self._nf4_blocksize = 0
        if isinstance(weight, GGUFWeight):
            self.qtype = weight.qtype.name
            self._gguf_type = weight.qtype
            self.register_buffer("qweight", weight.raw)
        elif isinstance(weight, NF4Weight):
            self.qtype = "nf4"
            self._nf4_blocksize = weight.blocksize
            self.register_buffer("qweight", weight.packed)
            self.register_buffer("nf4_absmax", weight.absmax)
            self.register_buffer("nf4_code", weight.code)
        elif isinstance(weight, torch.Tensor) and weight.dtype in FLOAT8_DTYPES:
            self.qtype = str(weight.dtype).removeprefix("torch.")
            self._float8_dtype = weight.dtype
            self.register_buffer("qweight", weight.contiguous().view(torch.uint8))
        else:
            raise TypeError(f"QuantizedLinear needs a GGUF, NF4 or float8 weight, not {type(weight).__name__}")
        if scale is not None:
            if not isinstance(weight, torch.Tensor) or scale.numel() != 1:
                raise UserError("A weight scale (scale_weight) must be one number beside a float8 weight.")
            scale = scale.to(device=self.qweight.device, dtype=torch.float32).reshape(())
        self.register_buffer("weight_scale", scale)  # float32 even when the module is cast (see _apply)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in ("weight_scale", "nf4_absmax", "nf4_code")}
        result = super()._apply(fn, recurse)
        for name, value in kept.items():  # float32 scales follow the device, never the dtype
            if value is not None:
                setattr(self, name, value.to(self.qweight.device))
        return result

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + (self.nf4_absmax.numel() * 4 if self.nf4_absmax is not None else 0)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.nf4_code is not None:
            return NF4Weight(self.qweight, self.nf4_absmax, self.nf4_code, self._nf4_blocksize,
                             (self.out_features, self.in_features)).dequantize(dtype)
        if hasattr(self, "_gguf_type"):
            return GGUFWeight(self.qweight, self._gguf_type, (self.out_features, self.in_features)).dequantize(dtype)
        weight = self.qweight.view(self._float8_dtype)
        if self.weight_scale is None:
            return weight.to(dtype)
        return (weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qtype={self.qtype}{', scaled' if self.weight_scale is not None else ''}")


def _set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, child)


def quantize_linears(module: nn.Module, state_dict: dict, *, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> list[str]:
    """Swap each `nn.Linear` of `module` whose `<name>.weight` in `state_dict` is quantized for a
    `QuantizedLinear` holding that weight (moved to `device`), its bias (cast to `dtype`) and its scaled-fp8
    factor `<name>.scale_weight` if any. The used entries (and `<name>.scale_input`) are popped from
    `state_dict`; returns the swapped module names."""
    swapped = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or not is_quantized(state_dict.get(f"{name}.weight")):
            continue
        weight = state_dict.pop(f"{name}.weight")
        if tuple(weight.shape) != (child.out_features, child.in_features):
            raise UserError(f"The weight of {name} has shape {tuple(weight.shape)} where "
                            f"{(child.out_features, child.in_features)} was expected: the file may be damaged.")
        if device is not None:
            weight = weight.to(device)
        bias = state_dict.pop(f"{name}.bias", None) if child.bias is not None else None
        if bias is not None:
            bias = dequantize(bias, dtype or torch.float32) if is_quantized(bias) else bias
            bias = bias.to(device=device or bias.device, dtype=dtype or bias.dtype)
        scale = state_dict.pop(f"{name}.scale_weight", None)
        state_dict.pop(f"{name}.scale_input", None)
        _set_child(module, name, QuantizedLinear(weight, bias, scale))
        swapped.append(name)
    return swapped


def load_quantized_weights(module: nn.Module, state_dict: dict, what: str, *, dtype: torch.dtype,
                           device: str | torch.device) -> None:
    """Strictly assign `state_dict` (plain, float8 and GGUF tensors) to `module` built on the meta device:
    quantized linear weights go into `QuantizedLinear`s, every other floating tensor is cast to `dtype`
    on `device` (quantized non-linear tensors, e.g. norm scales, are dequantized). Damage -> UserError."""
    from backend.engine.model_loader import check_fit, few_names
    state_dict = {k: v for k, v in state_dict.items() if k != SCALED_FP8_MARKER}
    expected = {k: v.shape for k, v in module.state_dict().items()}
    scales = {k for k in state_dict if k.endswith(SCALE_SUFFIXES)}
    check_fit(state_dict, expected, what, also_allowed=scales)
    state_dict = dict(state_dict)
    quantize_linears(module, state_dict, dtype=dtype, device=device)
    stray = [k for k in state_dict if k.endswith(SCALE_SUFFIXES)]
    if stray:
        raise UserError(f"The {what} file has weight scales beside weights that are not float8 linear weights: "
                        f"{few_names(stray)}. The file may be damaged.")
    rest = {}
    for k in list(state_dict):
        v = state_dict.pop(k)
        if is_quantized(v):
            v = dequantize(v.to(device), dtype)
        elif v.is_floating_point():
            v = v.to(device=device, dtype=dtype)
        else:
            v = v.to(device=device)
        rest[k] = v.contiguous()
    module.load_state_dict(rest, strict=False, assign=True)
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if left:
        raise UserError(f"The {what} weights leave {len(left)} tensors unset: {few_names(left)}.")
    target = torch.device(device)
    for name, buf in list(module.named_buffers()):  # non-persistent buffers were built real on the CPU
        if buf.device.type != target.type or (target.index is not None and buf.device.index != target.index):
            owner_name, _, leaf = name.rpartition(".")
            (module.get_submodule(owner_name) if owner_name else module)._buffers[leaf] = buf.to(target)
    module.eval()
    module.requires_grad_(False)


def stored_weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers (quantized weights at their stored size)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# -- bitsandbytes NF4 ------------------------------------------------------------------------------
class NF4Weight:
    """A bitsandbytes NF4 tensor: `packed` uint8 codes, two per byte (the first value in the high four bits), indices
    into the 16-value code book `code`; `absmax` the float32 scale of each block of `blocksize` values (in the
    tensor's row-major order); `shape` its logical shape. Row slices and row concatenations stay quantized when each
    row is whole blocks (`splits_by_rows`)."""

    __slots__ = ("packed", "absmax", "code", "blocksize", "shape")
    type_name = "nf4"

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape):
        self.shape = torch.Size(shape)
        self.blocksize = int(blocksize)
        numel = self.shape.numel()
        if self.blocksize <= 0 or packed.numel() != (numel + 1) // 2 or code.numel() != 16 \
                or absmax.numel() != -(-numel // self.blocksize):
            raise UserError(f"An NF4 tensor of shape {tuple(self.shape)} does not match its stored codes and scales: "
                            f"the file is damaged.")
        self.packed = packed.reshape(-1).view(torch.uint8)
        self.absmax, self.code = absmax.reshape(-1).float(), code.reshape(-1).float()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.absmax.numel() * 4

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def splits_by_rows(self) -> bool:
        row = self.shape[1:].numel() if self.ndim > 1 else 0
        return row > 0 and row % self.blocksize == 0 and row % 2 == 0

    def to(self, device) -> "NF4Weight":
        return NF4Weight(self.packed.to(device), self.absmax.to(device), self.code.to(device), self.blocksize,
                         self.shape)

    def rows(self, start: int, stop: int) -> "NF4Weight":
        row = self.shape[1:].numel()
        return NF4Weight(self.packed[start * row // 2:stop * row // 2],
                         self.absmax[start * row // self.blocksize:stop * row // self.blocksize], self.code,
                         self.blocksize, (stop - start, *self.shape[1:]))

    @staticmethod
    def cat_rows(parts: list["NF4Weight"]) -> "NF4Weight | torch.Tensor":
        first = parts[0]
        if any(p.blocksize != first.blocksize or p.shape[1:] != first.shape[1:] or not p.splits_by_rows
               or not torch.equal(p.code, first.code) for p in parts):
            return torch.cat([p.dequantize(torch.float32) for p in parts])  # not one NF4 tensor: plain values
        return NF4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.absmax for p in parts]), first.code,
                         first.blocksize, (sum(p.shape[0] for p in parts), *first.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).reshape(-1)[:self.numel()]
        values = self.code[codes.long()]
        blocks = -(-values.numel() // self.blocksize)
        values = torch.nn.functional.pad(values, (0, blocks * self.blocksize - values.numel()))
        values = (values.reshape(blocks, self.blocksize) * self.absmax[:, None]).reshape(-1)[:self.numel()]
        return values.reshape(self.shape).to(dtype)

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, device={self.device})"


# the quantized weights stored in blocks (not torch tensors): dequantize(), rows(), splits_by_rows
BLOCK_WEIGHTS = (GGUFWeight, NF4Weight)


_NF4_STATE = ".quant_state.bitsandbytes__"


def is_nf4(keys) -> bool:
    """A bitsandbytes 4-bit file (Forge's `flux1-dev-bnb-nf4`): per-weight `.absmax`, `.quant_map` and
    `.quant_state.bitsandbytes__nf4` tensors."""
    keys = list(keys)
    if any(_NF4_STATE in k for k in keys):
        return True
    return any(k.endswith(".absmax") for k in keys) and any(k.endswith(".quant_map") for k in keys)


def nf4_message(file_name: str = "This model") -> str:
    return f"{file_name} is a bitsandbytes 4-bit file whose weights Easel cannot read. {NF4_HINT}"


def read_nf4_weights(state_dict: dict, file_name: str = "This model") -> dict:
    """`state_dict` with each bitsandbytes NF4 weight (`<name>` packed codes beside `<name>.absmax`,
    `<name>.quant_map`, the nested scale tensors and `<name>.quant_state.bitsandbytes__nf4`, bitsandbytes'
    `QuantState.as_dict(packed=True)`) as one `NF4Weight` under `<name>`; other tensors as they are. FP4 files and
    damaged states are refused (UserError)."""
    import json
    states = [k for k in state_dict if _NF4_STATE in k]
    if not states:
        if is_nf4(state_dict.keys()):
            raise UserError(nf4_message(file_name) + " (its 4-bit weights have no quant_state tensors)")
        return state_dict
    out = dict(state_dict)
    for key in states:
        name, _, kind = key.partition(_NF4_STATE)
        if kind != "nf4":
            raise UserError(nf4_message(file_name) + f" ({kind.upper()} weights; Easel reads NF4 ones)")
        try:
            info = json.loads(bytes(out.pop(key).to(torch.uint8).tolist()).decode("utf-8"))
            packed, absmax, code = out.pop(name), out.pop(name + ".absmax"), out.pop(name + ".quant_map")
            if name + ".nested_absmax" in out:  # compress_statistics: the scales are 8-bit codes themselves
                nested_absmax, nested_code = out.pop(name + ".nested_absmax"), out.pop(name + ".nested_quant_map")
                nested_block = int(info["nested_blocksize"])
                index = torch.arange(absmax.numel()) // nested_block
                absmax = nested_code.float()[absmax.long().reshape(-1)] * nested_absmax.float().reshape(-1)[index]
                absmax = absmax + float(info["nested_offset"])
            weight = NF4Weight(packed, absmax.float(), code, int(info["blocksize"]), info["shape"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise UserError(f"{file_name}: the NF4 weight {name} cannot be read ({type(exc).__name__}: {exc}); "
                            f"the file may be damaged.") from None
        dtype = getattr(torch, str(info.get("dtype", "bfloat16")), None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{file_name}: the NF4 weight {name} names an unknown dtype {info.get('dtype')!r}.")
        out[name] = weight
    return out
