"""The app process's view of LoRA, embedding and checkpoint files: A1111's API lists and the extra-network cards.

`EaselService.networks` holds one. No torch: the embeddings list reads the embedding files' headers to
know their widths, and sorts them into loaded / skipped against the text encoders of the selected
checkpoint (read from its header), as A1111's `/sdapi/v1/embeddings` does.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from backend.networks.registry import FAMILY_LABELS, detect_family
from backend.embeddings import EmbeddingDatabase, checkpoint_text_dims
from backend.networks.registry import (EmbeddingRegistry, HypernetworkRegistry, LoraRegistry, NetworkEntry,
                                       find_preview)

THUMBNAIL_SIZE = 256


@dataclass
class Card:
    """One card of the extra-networks panel (Textual Inversion, Checkpoints, Lora)."""

    name: str
    insert: str  # what a click adds to the prompt (a checkpoint card: the checkpoint's title it selects)
    subfolder: str
    preview: str | None  # data: URL of a thumbnail
    description: str
    badge: str  # base model, or "skipped" for an embedding that does not fit
    search_text: str
    path: str = ""  # the file, for sorting by path
    mtime: float = 0.0  # the file's modification time, for sorting by date


SORT_KEYS = ("Name", "Date modified", "Path")


def sort_cards(cards: list[Card], key: str = "Name", descending: bool = False) -> list[Card]:
    """The cards ordered as the panel's sort controls ask: by name, date modified or path (ties by name)."""
    if key not in SORT_KEYS:
        key = "Name"
    by_name = sorted(cards, key=lambda c: (c.name.lower(), c.name))
    if key == "Name":
        return by_name[::-1] if descending else by_name
    field = (lambda c: c.mtime) if key == "Date modified" else (lambda c: c.path.lower())
    return sorted(by_name, key=field, reverse=descending)  # a stable sort keeps the name order among ties


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _thumbnail(path: Path | None, cache: dict) -> str | None:
    if path is None:
        return None
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    if key not in cache:
        from PIL import Image
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
            cache[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except (OSError, ValueError):
            cache[key] = None
    return cache[key]


def parse_metadata_values(metadata: dict) -> dict:
    """kohya stores nested data (tag frequencies, buckets) as JSON strings; decode those for display."""
    out = {}
    for k, v in metadata.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                out[k] = json.loads(v)
                continue
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def top_tags(metadata: dict, limit: int = 20) -> list[tuple[str, int]]:
    """The training tags, most frequent first, from `ss_tag_frequency` ({folder: {tag: count}})."""
    freq = parse_metadata_values({"f": metadata.get("ss_tag_frequency", "")}).get("f")
    counts: dict[str, int] = {}
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    try:
                        counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
                    except (TypeError, ValueError):
                        continue
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


class ExtraNetworksCatalog:
    def __init__(self, paths):
        self.paths = paths
        self.loras = LoraRegistry(paths.lora_dirs)
        self.hypernetworks = HypernetworkRegistry(getattr(paths, "hypernetwork_dirs", []) or [])
        self.embedding_files = EmbeddingRegistry(paths.embeddings_dir)
        self._embeddings = None  # backend.embeddings.EmbeddingDatabase, made on first use
        self._dims: dict[tuple, list[int] | None] = {}
        self._thumbs: dict = {}
        self._lock = threading.Lock()

    # -- refresh ------------------------------------------------------------------------------------
    def refresh_loras(self) -> None:
        self.loras.refresh()

    def refresh_hypernetworks(self) -> None:
        self.hypernetworks.refresh()

    def refresh_embeddings(self) -> None:
        self.embedding_files.refresh()
        if self._embeddings is not None:
            with self._lock:
                self._embeddings.refresh()

    # -- LoRA ---------------------------------------------------------------------------------------
    def lora_family(self, entry: NetworkEntry) -> str | None:
        return detect_family(self.loras.metadata(entry), set())

    def lora_api_list(self) -> list[dict]:
        """GET /sdapi/v1/loras: [{name, alias, path, metadata}] as A1111 answers."""
        return [{"name": e.name, "alias": self.loras.alias(e), "path": str(e.path), "metadata": self.loras.metadata(e)}
                for e in self.loras.entries]

    def lora_tag(self, entry: NetworkEntry, multiplier: float = 1.0) -> str:
        """`<lora:name:weight>` (the preferred weight from `name.json` when set, else `multiplier`: A1111's
        `extra_networks_default_multiplier`), then its activation text."""
        user = entry.user_metadata
        weight = user.get("preferred weight") or user.get("preferred_weight") or multiplier
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = multiplier
        text = f"<lora:{entry.name}:{weight:g}>"
        activation = str(user.get("activation text") or user.get("activation_text") or "").strip()
        return f"{text} {activation}" if activation else text

    def lora_cards(self, query: str = "", multiplier: float = 1.0) -> list[Card]:
        cards = []
        for e in self.loras.entries:
            family = self.lora_family(e)
            alias = self.loras.alias(e)
            card = Card(name=e.name, insert=self.lora_tag(e, multiplier), subfolder=e.subfolder,
                        preview=_thumbnail(e.preview, self._thumbs), path=str(e.path), mtime=_mtime(e.path),
                        description=e.description, badge=FAMILY_LABELS.get(family, "") if family else "",
                        search_text=" ".join([e.name, alias, e.subfolder, e.description]).lower())
            cards.append(card)
        return _filter(cards, query)

    def lora_details(self, name: str) -> dict | None:
        """What the metadata view shows: the main kohya fields, the top tags and everything else."""
        entry = self.loras.find(name)
        if entry is None:
            return None
        meta = self.loras.metadata(entry)
        family = self.lora_family(entry)
        summary = {
            "File": str(entry.path),
            "Alias": self.loras.alias(entry),
            "Base model": FAMILY_LABELS.get(family, "unknown") if family else "unknown",
            "Trained on checkpoint": meta.get("ss_sd_model_name", ""),
            "Base model version": meta.get("ss_base_model_version", ""),
            "Training resolution": meta.get("ss_resolution", ""),
            "Network": meta.get("ss_network_module", ""),
            "Rank (dim) / alpha": (f"{meta.get('ss_network_dim', '')} / {meta.get('ss_network_alpha', '')}"
                                   if meta.get("ss_network_dim") else ""),
            "Training images": meta.get("ss_num_train_images", ""),
            "Epochs": meta.get("ss_num_epochs", meta.get("ss_epoch", "")),
            "Clip skip": meta.get("ss_clip_skip", ""),
            "Description": entry.description,
        }
        return {"summary": {k: v for k, v in summary.items() if v not in ("", None)},
                "tags": top_tags(meta), "metadata": parse_metadata_values(meta)}

    # -- hypernetworks -------------------------------------------------------------------------------
    def hypernetwork_api_list(self) -> list[dict]:
        """GET /sdapi/v1/hypernetworks: [{name, path}] as A1111 answers (rescanned, as A1111 lists them anew)."""
        self.hypernetworks.refresh()
        return [{"name": e.name, "path": str(e.path)} for e in self.hypernetworks.entries]

    def hypernetwork_cards(self, query: str = "", multiplier: float = 1.0) -> list[Card]:
        """A card per hypernetwork; a click adds `<hypernet:name:multiplier>` (A1111's extra_networks_default_multiplier)."""
        cards = [Card(name=e.name, insert=f"<hypernet:{e.name}:{multiplier:g}>", subfolder=e.subfolder,
                      preview=_thumbnail(e.preview, self._thumbs), description=e.description, badge="",
                      path=str(e.path), mtime=_mtime(e.path),
                      search_text=" ".join([e.name, e.subfolder, e.description]).lower())
                 for e in self.hypernetworks.entries]
        return _filter(cards, query)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_cards(self, checkpoints: list, query: str = "") -> list[Card]:
        """A card per checkpoint (`ModelFile`s, with `name.png` / `name.preview.png` beside it as its picture);
        a click selects the checkpoint by its title."""
        cards = []
        for f in checkpoints:
            folder, _, base = f.name.replace("\\", "/").rpartition("/")
            cards.append(Card(name=base.rsplit(".", 1)[0], insert=f.title, subfolder=folder,
                              preview=_thumbnail(find_preview(f.path), self._thumbs), description=f.title,
                              badge=f.shorthash or "", path=str(f.path), mtime=_mtime(f.path),
                              search_text=" ".join([f.title, folder]).lower()))
        return _filter(cards, query)

    # -- embeddings ---------------------------------------------------------------------------------
    def _database(self):
        if self._embeddings is None:
            self._embeddings = EmbeddingDatabase(self.paths.embeddings_dir)
            self._embeddings.refresh()
        return self._embeddings

    def text_dims(self, checkpoint) -> list[int] | None:
        """The text-encoder widths of a checkpoint (`ModelFile`), from its header; None when unknown."""
        if checkpoint is None:
            return None
        try:
            key = (str(checkpoint.path), checkpoint.path.stat().st_mtime_ns)
        except OSError:
            return None
        if key not in self._dims:
            self._dims[key] = checkpoint_text_dims(checkpoint.path)
        return self._dims[key]

    def embeddings_api(self, checkpoint) -> dict:
        """GET /sdapi/v1/embeddings: {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {...}}."""
        with self._lock:
            db = self._database()
            db.refresh()
            loaded, skipped = db.split(self.text_dims(checkpoint))
        return {"loaded": {n: e.describe() for n, e in sorted(loaded.items())},
                "skipped": {n: e.describe() for n, e in sorted(skipped.items())}}

    def embedding_cards(self, checkpoint, query: str = "") -> list[Card]:
        with self._lock:
            db = self._database()
            db.refresh()
            loaded, skipped = db.split(self.text_dims(checkpoint))
            errors = dict(db.errors)
        cards = []
        for e in self.embedding_files.entries:
            emb = loaded.get(e.name) or skipped.get(e.name)
            if e.name in errors:
                badge, info = "unreadable", errors[e.name]
            elif emb is None:
                continue
            else:
                info = f"{emb.count} vector{'s' if emb.count != 1 else ''} of width {' + '.join(map(str, emb.dims))}" + \
                       (f", {emb.step} steps" if emb.step else "")
                badge = info if e.name in loaded else "does not fit this model"
            description = e.description + ("\n" if e.description else "") + info
            cards.append(Card(name=e.name, insert=e.name, subfolder=e.subfolder, preview=_thumbnail(e.preview, self._thumbs),
                              description=description, badge=badge, path=str(e.path), mtime=_mtime(e.path),
                              search_text=" ".join([e.name, e.subfolder, e.description]).lower()))
        return _filter(cards, query)


def _filter(cards: list[Card], query: str) -> list[Card]:
    words = [w for w in (query or "").lower().split() if w]
    return [c for c in cards if all(w in c.search_text for w in words)]
