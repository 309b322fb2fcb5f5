"""The Checkpoint Merger's job in the backend process: A, B, C merged tensor by tensor into a new file.

The app (`backend/merger.py`) checked the request against the files' headers; this reads the tensors. Sources are
read one tensor at a time (safetensors `safe_open`; `.ckpt` through a memory map where PyTorch's zip format
allows), so memory holds a few tensors, not three checkpoints. A `.safetensors` result is written as it is
computed: its header (every name, dtype and shape is known beforehand) first, then each tensor's bytes. A `.ckpt`
result is gathered in memory (one copy, in its final precision) and saved with `torch.save({"state_dict": ...})`.
Either is written to a temporary file beside the target and renamed when complete: Interrupt (checked between
tensors) or an error leaves no file behind. The rules (which keys merge, names, metadata) are A1111's, in
`backend.core.checkpoint_merge`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

import torch

from backend.core.checkpoint_merge import (EMA_PREFIX, discard_pattern, has_model_names, is_merged_key,
                                           legacy_hash, merge_metadata, normalize_key)
from backend.core.errors import UserError
from backend.core.tensor_headers import read_safetensors_metadata

log = logging.getLogger("easel.merger")

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Source:
    """One model file's tensors by (normalized) name, read when asked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._safe = None
        self._tensors: dict[str, torch.Tensor] = {}
        if self.path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            try:
                self._safe = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"Could not read {self.path.name}: {exc}") from exc
            self.names = {normalize_key(k): k for k in self._safe.keys()}
        else:
            self._tensors = {normalize_key(k): v for k, v in _load_pickle(self.path).items()}
            self.names = {k: k for k in self._tensors}

    def keys(self) -> list[str]:
        return list(self.names)

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def get(self, key: str) -> torch.Tensor:
        if self._safe is not None:
            return self._safe.get_tensor(self.names[key])
        return self._tensors[key]

    def slice_info(self, key: str) -> tuple[tuple, torch.dtype]:
        if self._safe is not None:
            sl = self._safe.get_slice(self.names[key])
            dtype = {v: k for k, v in _ST_DTYPES.items()}.get(sl.get_dtype())
            return tuple(sl.get_shape()), dtype
        t = self._tensors[key]
        return tuple(t.shape), t.dtype


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt's tensors, memory-mapped when it is in PyTorch's zip format (read per tensor as used)."""
    from backend.engine.state_dict_io import _extract_tensors, read_state_dict, safe_unpickle_globals
    if zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(safe_unpickle_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return _extract_tensors(obj, path)
        except UserError:
            raise
        except Exception:  # noqa: BLE001  anything unusual: the ordinary reader, with its messages
            pass
    return read_state_dict(path)


def _out_dtype(a: torch.dtype, b: torch.dtype | None) -> torch.dtype:
    if b is None or a == b:
        return a
    if a in _WIDE_FLOATS and b in _WIDE_FLOATS:
        return torch.promote_types(a, b)
    return a


def _half(dtype: torch.dtype, enable: bool) -> torch.dtype:
    return torch.float16 if enable and dtype == torch.float32 else dtype


def _bake_vae(path: Path, a: _Source) -> dict[str, torch.Tensor]:
    """A VAE file's tensors under the checkpoint's `first_stage_model.` names (the loader's key map: any layout it
    reads, converted to the LDM names a checkpoint uses). Only names the checkpoint has are used, as A1111 does."""
    from backend.engine.ldm_convert import convert_vae_diffusers_to_ldm
    from backend.engine.model_loader import load_vae_file

    diffusers_sd = load_vae_file(path)
    levels = 1 + max((int(k.split(".")[2]) for k in diffusers_sd if k.startswith("encoder.down_blocks.")), default=0)
    ldm = convert_vae_diffusers_to_ldm(diffusers_sd, levels)
    baked = {}
    for key, value in ldm.items():
        name = "first_stage_model." + key
        if name not in a:
            continue
        shape, _dtype = a.slice_info(name)
        if tuple(value.shape) != shape:
            if value.numel() != _numel(shape):
                raise UserError(f"The VAE {path.name} does not fit this model: {name} has shape {list(value.shape)} "
                                f"in the VAE and {list(shape)} in the checkpoint.")
            value = value.reshape(shape)
        baked[name] = value
    if not baked:
        raise UserError(f"The VAE {path.name} has no weights this model's VAE (first_stage_model.*) uses.")
    return baked


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def run_merge(payload: dict, control, hashes) -> dict:
    """Merge as `payload` (from `backend.merger.plan_merge`) says; -> {"path", "name", "warnings"}."""
    req = payload["request"]
    method = req.interp_method
    target: Path = payload["target"]
    files = [f for f in (payload["primary"], payload["secondary"], payload["tertiary"]) if f is not None]
    a, b, c = (_Source(f.path) if f is not None else None
               for f in (payload["primary"], payload["secondary"], payload["tertiary"]))
    layout = has_model_names(a.keys())
    multiplier = float(req.multiplier)
    pattern = discard_pattern(req.discard_weights)
    baked = _bake_vae(payload["vae"].path, a) if payload.get("vae") is not None else {}

    keys = [k for k in a.keys() if not (pattern and pattern.search(k)) and not (req.prune_ema and k.startswith(EMA_PREFIX))]
    plan = []  # (key, shape, dtype)
    for key in keys:
        shape, dtype = a.slice_info(key)
        if key in baked:
            dtype = baked[key].dtype
        elif b is not None and key in b and is_merged_key(key, layout) and dtype is not None and dtype.is_floating_point:
            dtype = _out_dtype(dtype, b.slice_info(key)[1])
        if dtype is None:
            raise UserError(f"{payload['primary'].name}: {key} has a tensor type Easel cannot merge.")
        plan.append((key, shape, _half(dtype, req.save_as_half)))

    warnings: list[str] = []
    metadata = {}
    if req.checkpoint_format == "safetensors" and req.save_metadata:
        sources = []
        for f in files:
            own = read_safetensors_metadata(f.path) if f.path.suffix.lower() == ".safetensors" else {}
            sources.append({"name": f.name, "sha256": hashes.sha256(f.path), "legacy_hash": legacy_hash(f.path),
                            "metadata": own})
        metadata = merge_metadata(req, sources, is_inpainting=payload["is_inpainting"], is_ip2p=payload["is_ip2p"],
                                  warnings=warnings)

    def merged(key: str, dtype: torch.dtype) -> torch.Tensor:
        t = a.get(key)
        if key in baked:
            return baked[key].to(dtype)
        if b is None or key not in b or not is_merged_key(key, layout) or not t.is_floating_point():
            return t.to(dtype) if t.is_floating_point() else t
        other = b.get(key).float()
        if method == "Add difference":
            if key in c:
                other = other - c.get(key).float()
            else:
                other = torch.zeros_like(other)
        base = t.float()
        part = base[:, 0:4] if base.shape != other.shape else base  # inpainting / pix2pix A: its first 4 channels
        if method == "Weighted sum":
            result = (1 - multiplier) * part + multiplier * other
        else:
            result = part + multiplier * other
        if part is not base:
            base = base.clone()
            base[:, 0:4] = result
            result = base
        return result.to(dtype)

    control.begin(1, len(plan))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        if req.checkpoint_format == "safetensors":
            _write_safetensors(tmp, plan, metadata, merged, control)
        else:
            state = {}
            for key, _shape, dtype in plan:
                _check_interrupt(control)
                state[key] = merged(key, dtype).contiguous()
                control.step(None)
            torch.save({"state_dict": state}, tmp)
            del state
        if target.exists():
            raise UserError(f"{target.name} appeared in {target.parent} during the merge; it was not overwritten.",
                            status=409)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    config = payload.get("config")
    if config is not None:
        shutil.copyfile(config, target.with_suffix(".yaml"))
    hashes.sha256(target)  # its title carries the hash at once
    log.info("checkpoint merged into %s", target)
    return {"path": str(target), "name": target.name, "warnings": warnings}


def _check_interrupt(control) -> None:
    if control.interrupted():
        raise UserError("The merge was interrupted; no file was written.")


def _write_safetensors(tmp: Path, plan, metadata: dict, merged, control) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, shape, dtype in plan:
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in plan:
            _check_interrupt(control)
            t = merged(key, dtype)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"merge of {key} gave {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}")
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            control.step(None)
