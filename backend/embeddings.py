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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.networks.registry import EmbeddingRegistry, NetworkHashes, short_hash

log = logging.getLogger("easel.embeddings")

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: list[torch.Tensor]  # one [n, dim] per text encoder it is made for (SDXL: clip_l, clip_g)
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


def _as_matrix(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise UserError(f"{what} is not a float tensor.")
    t = t.detach().to(torch.float32)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0:
        raise UserError(f"{what} has shape {tuple(t.shape)}; an embedding is [vectors, width].")
    return t


def _load_raw(path: Path):
    if path.suffix.lower() == ".safetensors":
        from backend.state_dict_io import read_state_dict
        return read_state_dict(path)
    from backend.state_dict_io import safe_unpickle_globals
    try:
        with torch.serialization.safe_globals(safe_unpickle_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  anything unreadable is a damaged or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Could not read the embedding {path.name}: the file is damaged, or holds Python "
                        f"objects Easel will not unpickle ({first[:200]}).") from exc


def read_embedding_file(path: Path) -> Embedding:
    """Read one textual-inversion file; `UserError` (naming it) when it is not one."""
    path = Path(path)
    data = _load_raw(path)
    what = f"The embedding {path.name}"
    if not isinstance(data, dict) or not data:
        raise UserError(f"{what} holds no embedding (found {type(data).__name__}).")
    meta = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{what} should hold exactly one vector set in string_to_param.")
        vectors = [_as_matrix(next(iter(params.values())), what)]
        meta = {"step": data.get("step"), "sd_checkpoint": data.get("sd_checkpoint"),
                "sd_checkpoint_name": data.get("sd_checkpoint_name")}
    elif "clip_l" in data and "clip_g" in data:
        vectors = [_as_matrix(data["clip_l"], f"{what} (clip_l)"), _as_matrix(data["clip_g"], f"{what} (clip_g)")]
        if vectors[0].shape[0] != vectors[1].shape[0]:
            raise UserError(f"{what} has {vectors[0].shape[0]} clip_l vectors but {vectors[1].shape[0]} clip_g vectors.")
    elif "emb_params" in data:
        vectors = [_as_matrix(data["emb_params"], what)]
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vectors = [_as_matrix(next(iter(data.values())), what)]  # diffusers: {"<token>": vector}
    else:
        raise UserError(f"{what} is not a textual-inversion file Easel recognizes "
                        f"(keys: {', '.join(sorted(map(str, data))[:5])}).")
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        value = meta.get(key)
        if isinstance(value, torch.Tensor):
            value = value.item()
        meta[key] = value if isinstance(value, (int, str)) else None
    st = path.stat()
    return Embedding(name=path.stem, path=path, vectors=vectors, stamp=(st.st_size, st.st_mtime_ns), **meta)


def checkpoint_text_dims(path: Path) -> list[int] | None:
    """The text encoders' widths of a checkpoint file, read from its header (None when unknown)."""
    from backend.controlnet.model_files import read_shapes
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

    def __init__(self, folder: Path, hashes: NetworkHashes | None = None):
        self.registry = EmbeddingRegistry(folder)
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
                loaded[entry.name] = read_embedding_file(entry.path)
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

    def for_job(self, model, extra_params: dict, warnings: list[str]) -> "JobEmbeddings":
        self.refresh()
        return JobEmbeddings(list(self.loaded.values()), model, extra_params, warnings, self.hashes)


@dataclass
class _Candidate:
    ids: list[int]
    embedding: Embedding
    fits: bool


class JobEmbeddings:
    """The embeddings one job's prompts may use, as the text conditioner looks them up.

    `find_at(tokens, i)` answers whether an embedding's name starts at token i; the conditioner then
    puts placeholders in the chunk and `vectors(emb, encoder_index)` in their place. Using one records
    it for the infotext (`TI hashes`); naming one that does not fit adds a warning instead.
    """

    def __init__(self, embeddings: list[Embedding], model, extra_params: dict, warnings: list[str],
                 hashes: NetworkHashes | None = None):
        self.model = model
        self.extra_params = extra_params
        self.warnings = warnings
        self.hashes = hashes or NetworkHashes(None)
        self.dims = list(model.text_encoder_hidden_sizes)
        self.used: dict[str, str] = {}
        self._warned: set[str] = set()
        self._by_first: dict[int, list[_Candidate]] = {}
        tokenizer = model.tokenizers[0]
        for emb in embeddings:
            ids = tokenizer([emb.name], truncation=False, add_special_tokens=False)["input_ids"][0]
            if not ids:
                continue
            self._by_first.setdefault(ids[0], []).append(_Candidate(list(ids), emb, emb.fits(self.dims)))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: len(c.ids), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._by_first)

    def find_at(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The fitting embedding whose name's tokens start at `position`, and how many tokens the name takes."""
        for cand in self._by_first.get(tokens[position], ()):
            if tokens[position:position + len(cand.ids)] == cand.ids:
                if cand.fits:
                    self._mark_used(cand.embedding)
                    return cand.embedding, len(cand.ids)
                self._warn_misfit(cand.embedding)
                return None
        return None

    def vectors(self, emb: Embedding, encoder_index: int) -> torch.Tensor:
        return emb.vectors[encoder_index]

    def _mark_used(self, emb: Embedding) -> None:
        if emb.name in self.used:
            return
        try:
            self.used[emb.name] = short_hash(self.hashes.embedding_hash(emb.path))
        except OSError:
            self.used[emb.name] = ""
        hashed = [f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in self.used.items() if h]
        if hashed:
            self.extra_params["TI hashes"] = ", ".join(hashed)

    def _warn_misfit(self, emb: Embedding) -> None:
        if emb.name in self._warned:
            return
        self._warned.add(emb.name)
        family = FAMILY_LABELS.get(self.model.family, self.model.family)
        want = " + ".join(str(d) for d in self.dims)
        self.warnings.append(f"Embedding {emb.name} ({emb.path.name}) has vectors of width "
                             f"{' + '.join(str(d) for d in emb.dims)} but the loaded {family} model needs {want}; "
                             f"it was not used and its name was read as plain words.")
