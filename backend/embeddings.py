"""Textual inversion: embedding files, and the vectors the prompt's words are replaced with.

Formats read (all without unpickling code):
    A1111 `.pt`               {"string_to_param": {"*": [n, dim]}, "name", "step", "sd_checkpoint", ...}
    `.safetensors` / `.pt`    {"emb_params": [n, dim]}
    diffusers `.bin`          {"<token>": [dim] or [n, dim]}
    SDXL `.safetensors`       {"clip_l": [n, 768], "clip_g": [n, 1280]}

An embedding is used by writing its file name (without extension) in the prompt. As in A1111, the
name's tokens are found in the tokenized prompt and replaced by n placeholder tokens whose token
embeddings are swapped for the file's vectors while the text encoder runs; the emphasis weights of
the words around them apply to them too (`(my-style:1.3)`). It fits a model when its vector width
equals each text encoder's (SD 1.x 768, SD 2.x 1024, SDXL clip_l 768 + clip_g 1280); one that does
not fit is listed as skipped, and a prompt that names it gets a warning and keeps the words as text.

Torch-free: the app lists the embeddings from the files' headers (`read_embedding_info`); the backend reads
their vectors and looks them up in prompts (`backend.engine.embeddings`) with the same parser.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.core.errors import UserError
from backend.core.tensor_headers import TensorHeader, read_pickle_headers, read_shapes
from backend.networks.registry import EmbeddingRegistry, NetworkHashes

log = logging.getLogger("easel.embeddings")


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: list  # one [n, dim] per text encoder it is made for (SDXL: clip_l, clip_g): tensors in the
    # backend, `TensorHeader`s (shape only) in the app's lists
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    stamp: tuple = ()

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def dims(self) -> list[int]:
        return [int(v.shape[-1]) for v in self.vectors]

    @property
    def shape(self) -> int:
        """A1111's `shape`: the vector width (SDXL: clip_l + clip_g)."""
        return sum(self.dims)

    def fits(self, encoder_dims: list[int]) -> bool:
        return self.dims == list(encoder_dims)

    def describe(self) -> dict:
        """The entry of A1111's `/sdapi/v1/embeddings`."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.count}


def _is_tensor(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "is_floating_point")


def _header_matrix(t, what: str) -> TensorHeader:
    """A vector set as the app sees it (shape only), checked as the backend checks the tensors."""
    if not isinstance(t, TensorHeader) or not t.is_floating_point():
        raise UserError(f"{what} is not a float tensor.")
    if t.ndim == 1:
        t = TensorHeader((1,) + t.shape, t.dtype)
    if t.ndim != 2 or t.shape[0] == 0:
        raise UserError(f"{what} has shape {tuple(t.shape)}; an embedding is [vectors, width].")
    return t


def parse_embedding(data, path: Path, as_matrix: Callable) -> Embedding:
    """An Embedding from what a file holds (`data`: tensors, or `TensorHeader`s); `as_matrix(value, what)` checks
    and shapes one vector set as [n, width]. `UserError` (naming the file) when it is not a textual inversion."""
    what = f"The embedding {path.name}"
    if not isinstance(data, dict) or not data:
        raise UserError(f"{what} holds no embedding (found {type(data).__name__}).")
    meta = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{what} should hold exactly one vector set in string_to_param.")
        vectors = [as_matrix(next(iter(params.values())), what)]
        meta = {"step": data.get("step"), "sd_checkpoint": data.get("sd_checkpoint"),
                "sd_checkpoint_name": data.get("sd_checkpoint_name")}
    elif "clip_l" in data and "clip_g" in data:
        vectors = [as_matrix(data["clip_l"], f"{what} (clip_l)"), as_matrix(data["clip_g"], f"{what} (clip_g)")]
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise UserError(f"{what} has {vectors[0].shape[0]} clip_l vectors but {vectors[1].shape[0]} clip_g vectors.")
    elif "emb_params" in data:
        vectors = [as_matrix(data["emb_params"], what)]
    elif len(data) == 1 and _is_tensor(next(iter(data.values()))):
        vectors = [as_matrix(next(iter(data.values())), what)]  # diffusers: {"<token>": vector}
    else:
        raise UserError(f"{what} is not a textual-inversion file Easel recognizes "
                        f"(keys: {', '.join(sorted(map(str, data))[:5])}).")
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        value = meta.get(key)
        if _is_tensor(value):  # a number saved as a tensor: only the backend reads its value
            value = value.item() if hasattr(value, "item") else None
        meta[key] = value if isinstance(value, (int, str)) else None
    st = path.stat()
    return Embedding(name=path.stem, path=path, vectors=vectors, stamp=(st.st_size, st.st_mtime_ns), **meta)


def read_embedding_info(path: Path) -> Embedding:
    """One textual-inversion file as listed (vectors as `TensorHeader`s: count and width, never the weights)."""
    path = Path(path)
    data = read_shapes(path) if path.suffix.lower() == ".safetensors" else read_pickle_headers(path)
    return parse_embedding(data, path, _header_matrix)


def checkpoint_text_dims(path: Path) -> list[int] | None:
    """The text encoders' widths of a checkpoint file, read from its header (None when unknown)."""
    try:
        shapes = read_shapes(Path(path))
    except (UserError, OSError):
        return None
    def width(*keys):
        for key in keys:
            if key in shapes:
                return int(shapes[key].shape[-1])
        return None
    sdxl = [width("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"),
            width("conditioner.embedders.1.model.token_embedding.weight")]
    if all(sdxl):
        return sdxl
    single = width("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                   "cond_stage_model.transformer.embeddings.token_embedding.weight",
                   "cond_stage_model.model.token_embedding.weight")
    return [single] if single else None


class EmbeddingDatabase:
    """The embeddings of a folder, read once and again only when a file changes."""

    def __init__(self, folder: Path, hashes: NetworkHashes | None = None,
                 read: Callable[[Path], Embedding] = read_embedding_info):
        self.registry = EmbeddingRegistry(folder)
        self._read = read  # read_embedding_info (the app: shapes only) or the backend's reader of the vectors
        self.hashes = hashes or NetworkHashes(None)
        self.loaded: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}  # name -> why the file could not be read
        self._error_stamps: dict[str, tuple] = {}

    def refresh(self) -> None:
        self.registry.refresh()
        loaded, errors = {}, {}
        for entry in self.registry.entries:
            try:
                stamp = entry.stamp
            except OSError:
                continue  # gone since the scan
            old = self.loaded.get(entry.name)
            if old is not None and old.path == entry.path and old.stamp == stamp:
                loaded[entry.name] = old
                continue
            seen = self._error_stamps.get(entry.name)
            if seen == (entry.path, stamp):
                errors[entry.name] = self.errors[entry.name]
                continue
            try:
                loaded[entry.name] = self._read(entry.path)
            except (UserError, OSError) as exc:
                errors[entry.name] = getattr(exc, "message", str(exc))
                self._error_stamps[entry.name] = (entry.path, stamp)
                log.warning("embedding %s: %s", entry.path.name, errors[entry.name])
        self.loaded, self.errors = loaded, errors

    def split(self, encoder_dims: list[int] | None) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) for a model with these text-encoder widths (all loaded when unknown)."""
        if not encoder_dims:
            return dict(self.loaded), {}
        fit = {n: e for n, e in self.loaded.items() if e.fits(encoder_dims)}
        return fit, {n: e for n, e in self.loaded.items() if n not in fit}
