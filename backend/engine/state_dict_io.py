"""Reading model files into state dicts, safely.

`.safetensors` files are read with safetensors. Pickle-based files (`.ckpt`, `.pt`,
`.pth`, `.bin`) are read with `torch.load(weights_only=True)`, which refuses to build
arbitrary Python objects: a file that needs more than tensors and plain containers is
refused with a message suggesting a conversion to `.safetensors`. Every problem with
the file itself (missing, truncated, not a model) becomes a `UserError` naming it. Headers (names,
shapes, metadata) are read without torch by `backend.core.tensor_headers`.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.core.tensor_headers import (INERT_GLOBALS, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, InertValue,
                                        pickle_refused, read_safetensors_header)


def read_state_dict(path: Path, *, exclude_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a model file, on the CPU, keyed by name (nested `state_dict` unwrapped).

    Keys starting with one of `exclude_prefixes` are left out (for `.safetensors` they are
    never read, e.g. the `model_ema.` copies that double some checkpoints' size).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path, exclude_prefixes)
    if suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(path)
        if exclude_prefixes:
            sd = {k: v for k, v in sd.items() if not k.startswith(exclude_prefixes)}
        return sd
    raise UserError(f"Unsupported model file type {suffix or '(none)'!r} for {path.name}: "
                    f"expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}.")


def _read_safetensors(path: Path, exclude_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    header = read_safetensors_header(path)  # clear message for the common truncation cases
    size = path.stat().st_size
    try:
        ends = [int(info.get("data_offsets", [0, 0])[1]) for key, info in header.items()
                if key != "__metadata__" and isinstance(info, dict)]
    except (TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path.name} has a malformed safetensors header (corrupt file?).") from e
    if ends and 8 + _header_length(path) + max(ends) > size:
        raise UserError(f"{path.name} is truncated: its header describes more data than the file holds "
                        f"(incomplete download?).")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not (exclude_prefixes and key.startswith(exclude_prefixes)):
                    tensors[key] = f.get_tensor(key)
        return tensors
    except Exception as e:  # safetensors raises SafetensorError / OSError with terse messages
        raise UserError(f"Could not read {path.name}: the file is corrupt or incomplete ({e}).") from e


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def safe_unpickle_globals() -> list:
    """The extra globals `torch.load(weights_only=True)` may accept: inert stand-ins for training-only
    classes and numpy scalars/dtypes, all plain data. Use with `torch.serialization.safe_globals`."""
    extra: list = [(InertValue, name) for name in INERT_GLOBALS]
    try:  # numpy scalars and dtypes (e.g. a `global_step` saved as numpy.int64) are plain data
        import numpy as np
        try:
            from numpy._core.multiarray import scalar  # numpy 2
        except ImportError:
            from numpy.core.multiarray import scalar  # numpy 1
        extra += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
        extra += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    except Exception:  # noqa: BLE001  numpy missing or laid out differently: no extra allowances
        pass
    return extra


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    return _extract_tensors(load_pickle(path), path)


def load_pickle(path: Path):
    """What a `.ckpt`/`.pt`/`.pth`/`.bin` file holds, loaded with `weights_only` (plain data and tensors only);
    a file that needs more, or a damaged one, raises `UserError` naming it."""
    try:
        with torch.serialization.safe_globals(safe_unpickle_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "unsupported GLOBAL" in text or "allowlisted" in text:
            found = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "a Python object"
            raise pickle_refused(path, found) from e
        raise UserError(f"Could not read {path.name}: the file is corrupt or not a PyTorch checkpoint ({_short(e)}).") from e
    except Exception as e:  # noqa: BLE001  truncated zips, garbage bytes, ... all mean a damaged file
        raise UserError(f"Could not read {path.name}: the file is corrupt or incomplete ({_short(e)}).") from e
    return obj


def _extract_tensors(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict (found {type(obj).__name__}).")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path.name} holds no tensors.")
    return tensors


def _short(e: Exception, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
