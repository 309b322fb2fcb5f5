"""Textual-inversion vectors in the backend: embedding files read with their tensors, and the embeddings a
job's prompts use (`JobEmbeddings`, looked up by the text conditioner).

What the files are (formats, names, widths) is `backend.embeddings` (torch-free, also used by the app's lists).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.embeddings import Embedding, EmbeddingDatabase, parse_embedding
from backend.networks.registry import FAMILY_LABELS, NetworkHashes, short_hash

log = logging.getLogger("easel.embeddings")


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
        from backend.engine.state_dict_io import read_state_dict
        return read_state_dict(path)
    from backend.engine.state_dict_io import safe_unpickle_globals
    try:
        with torch.serialization.safe_globals(safe_unpickle_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  anything unreadable is a damaged or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Could not read the embedding {path.name}: the file is damaged, or holds Python "
                        f"objects Easel will not unpickle ({first[:200]}).") from exc


def read_embedding_file(path: Path) -> Embedding:
    """Read one textual-inversion file with its vectors (float32 tensors); `UserError` (naming it) when it is not one."""
    path = Path(path)
    return parse_embedding(_load_raw(path), path, _as_matrix)


class EmbeddingVectors(EmbeddingDatabase):
    """The embeddings of a folder with their vectors, read once and again only when a file changes (the backend's)."""

    def __init__(self, folder: Path, hashes: NetworkHashes | None = None):
        super().__init__(folder, hashes, read=read_embedding_file)

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
