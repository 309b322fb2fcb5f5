"""What a model file holds, read without torch: tensor names, shapes and dtypes, and plain values.

Both processes use it. The app lists and sorts model files by what they are (a ControlNet's family, a
checkpoint's text-encoder widths, an embedding's vector count) without importing torch; the engine reads
the same headers before loading weights.

- `.safetensors`: the JSON header at the start of the file.
- pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`; PyTorch's zip format and its older single-pickle
  format): the pickle is read by an unpickler that builds only plain containers and numbers; each tensor
  becomes a `TensorHeader` (its shape and dtype: the weights are never read), and any other Python
  object is refused, as `torch.load(weights_only=True)` would (the same allowances for old training
  checkpoints: Lightning callbacks and numpy scalars are read as inert placeholders).

Every problem with the file (missing, truncated, not a model) is a `UserError` naming it.
"""
from __future__ import annotations

import collections
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # PyTorch's pre-1.6 (non-zip) format starts with this pickled number

# safetensors dtype names and PyTorch storage class names -> one spelling (torch's dtype names).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
                   "UntypedStorage": "uint8"}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})

# Globals old Stable Diffusion .ckpt files carry beside their weights (A1111 allows the same ones).
INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)


@dataclass(frozen=True)
class TensorHeader:
    """Stands in for a tensor where only its shape and dtype are needed."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype in FLOAT_DTYPES


# -- safetensors ------------------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict:
    """A .safetensors file's JSON header ({name: {dtype, shape, data_offsets}}, `__metadata__`) without
    reading the tensors; `UserError` naming the file when it is missing, truncated or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            data = f.read(length)
            if len(data) != length:
                raise ValueError("header is truncated")
        header = json.loads(data.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path.name} is not a valid .safetensors file (corrupt or incomplete download?): {e}") from e


def read_safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a `.safetensors` file's header (strings), read without loading any tensor."""
    path = Path(path)
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise UserError(f"{path.name} has a malformed safetensors header (metadata is not a mapping).")
    return dict(meta)


# -- pickles ----------------------------------------------------------------------------------------
class _Storage:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class InertValue:
    """Stands in for bookkeeping objects of old training checkpoints (Lightning callbacks, numpy scalars here):
    created empty, it drops whatever state the pickle gives it, so nothing of the original class runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, storage_offset, size, *args, **kwargs) -> TensorHeader:
    return TensorHeader(tuple(int(s) for s in size), getattr(storage, "dtype", "float32"))


def _encode(text: str, encoding: str = "latin1") -> bytes:
    return str(text).encode(encoding)


def _rebuild_parameter(data, *args, **kwargs):
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Builds plain containers, numbers and strings; tensors become `TensorHeader`s; nothing else."""

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full == "torch.Size":
            return tuple
        if full == "_codecs.encode":  # how protocol-2 pickles spell bytes (numpy scalars' payload)
            return _encode
        if full in INERT_GLOBALS or module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") \
                and name in ("scalar", "dtype") or module == "numpy.dtypes":
            return InertValue
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full}")

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            kind = pid[1]
            return _Storage(kind.dtype if isinstance(kind, _StorageType) else "uint8")
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")


def pickle_refused(path: Path, found: str) -> UserError:
    """The error for a pickle that holds `found` (a global) beyond plain data."""
    return UserError(f"{path.name} contains Python objects ({found}) beyond plain tensors, which Easel will not unpickle "
                     f"for safety: unpickling can run arbitrary code. Convert the file to .safetensors with a tool you "
                     f"trust, or download a .safetensors version of this model.")


def _pickle_bytes(path: Path):
    """The main pickle of a PyTorch file: (file-like positioned at it, legacy?)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError("no data.pkl in the archive")
            import io
            return io.BytesIO(z.read(min(names, key=len))), False
    return open(path, "rb"), True


def read_pickle_headers(path: Path):
    """What a `.ckpt`/`.pt`/`.pth`/`.bin` file holds, tensors as `TensorHeader`s; `UserError` naming the file
    when it holds Python objects beyond plain data (never built) or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    try:
        f, legacy = _pickle_bytes(path)
        with f:
            if legacy:
                magic = _HeaderUnpickler(f).load()
                if magic != _LEGACY_MAGIC:
                    raise ValueError("not a PyTorch file")
                _HeaderUnpickler(f).load()  # protocol version
                _HeaderUnpickler(f).load()  # system info
            return _HeaderUnpickler(f).load()
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text:
            found = text.split("GLOBAL", 1)[1].split()[0]
            raise pickle_refused(path, found) from e
        raise UserError(f"Could not read {path.name}: the file is corrupt or not a PyTorch checkpoint ({e}).") from e
    except Exception as e:  # noqa: BLE001  truncated zips, garbage bytes, ... all mean a damaged file
        raise UserError(f"Could not read {path.name}: the file is corrupt or incomplete ({type(e).__name__}: {e}).") from e


# -- GGUF ------------------------------------------------------------------------------------------
GGUF_SUFFIXES = (".gguf",)


def read_gguf_shapes(path: Path) -> dict[str, TensorHeader]:
    """{tensor name: TensorHeader} of a `.gguf` file (quantized transformers: FLUX.1, SD3), read with the `gguf`
    package's reader (numpy, a memory map: the weights are not read). Shapes in PyTorch's order (GGUF stores
    them reversed); the dtype is the GGUF type's name for quantized tensors ("Q8_0", "Q4_K", ...), torch's for
    the others."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path), "r")
        out = {}
        for t in reader.tensors:
            kind = t.tensor_type.name
            dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(kind, kind)
            out[t.name] = TensorHeader(tuple(int(n) for n in reversed(list(t.shape))), dtype)
        return out
    except Exception as e:  # noqa: BLE001  a damaged or foreign file: the reader's own words
        raise UserError(f"{path.name} is not a valid GGUF file (corrupt or incomplete download?): {e}") from e


def read_shapes(path: Path) -> dict[str, TensorHeader]:
    """{tensor name: TensorHeader} of a model file (a nested `state_dict` unwrapped), weights never read."""
    path = Path(path)
    if path.suffix.lower() in GGUF_SUFFIXES:
        return read_gguf_shapes(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        try:
            return {k: TensorHeader(tuple(int(s) for s in v["shape"]), _SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"]))
                    for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path.name} has a malformed safetensors header (corrupt file?).") from e
    obj = read_pickle_headers(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, TensorHeader)}
