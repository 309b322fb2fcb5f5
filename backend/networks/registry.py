"""LoRA, hypernetwork and embedding files on disk: listing, metadata, previews, descriptions and A1111's hashes.

Used by the app process (the LoRA / Textual Inversion tabs, `/sdapi/v1/loras`, `/sdapi/v1/embeddings`)
and by the backend (finding the file a `<lora:name:...>` tag names). No torch here.

Names are file names without extension, as in A1111; a file in a subfolder keeps its plain name
(the folder shows on its card). When two files share a name the first found (folders in order,
then by path) wins and the others are listed as duplicates. A LoRA can also be named by its alias,
kohya's `ss_output_name` in the file's metadata.

Hashes, as A1111 v1.10 writes them in infotexts (`Lora hashes: "name: 0123456789ab"`): a LoRA's is
kohya's `sshs_model_hash` from its metadata when present, else for `.safetensors` the "addnet" hash
(sha256 of the bytes after the header, which kohya and Civitai use), else the sha256 of the whole
file; an embedding's is the sha256 of its file. The short form is the first 12 hex digits.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.errors import UserError
from backend.core.paths import list_files
from backend.core.tensor_headers import read_safetensors_metadata

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
HYPERNETWORK_EXTENSIONS = (".pt",)  # as A1111 (it lists **/*.pt)
PREVIEW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# Metadata fields shown first (A1111's order), then the rest by name.
METADATA_ORDER = {"ss_sd_model_name": 1, "ss_base_model_version": 2, "ss_resolution": 3, "ss_clip_skip": 4,
                  "ss_network_module": 5, "ss_network_dim": 6, "ss_network_alpha": 7, "ss_num_train_images": 10,
                  "ss_tag_frequency": 20}
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD 3"}

_LOCK = threading.Lock()


@dataclass
class NetworkEntry:
    """One file: its name, where it is, and what sits beside it."""

    name: str
    path: Path
    root: Path  # the folder it was found under
    preview: Path | None = None
    description: str = ""
    user_metadata: dict = field(default_factory=dict)  # A1111's `name.json` (activation text, preferred weight, ...)

    @property
    def subfolder(self) -> str:
        rel = self.path.parent.relative_to(self.root) if self.root in self.path.parents else Path()
        return "" if str(rel) == "." else rel.as_posix()

    @property
    def stamp(self) -> tuple:
        st = os.stat(self.path)
        return (st.st_size, st.st_mtime_ns)


def find_preview(path: Path) -> Path | None:
    """`name.png` or `name.preview.png` (also .jpg/.jpeg/.webp/.gif) beside the file."""
    base = path.with_suffix("")
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (Path(f"{base}{ext}"), Path(f"{base}.preview{ext}")):
            if candidate.is_file():
                return candidate
    return None


def _read_beside(path: Path) -> tuple[str, dict]:
    base = path.with_suffix("")
    description = ""
    for candidate in (Path(f"{base}.txt"), Path(f"{base}.description.txt")):
        if candidate.is_file():
            try:
                description = candidate.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                pass
            break
    user = {}
    json_file = Path(f"{base}.json")
    if json_file.is_file():
        try:
            data = json.loads(json_file.read_text(encoding="utf-8", errors="replace"))
            user = data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError):
            pass
    if not description and isinstance(user.get("description"), str):
        description = user["description"].strip()
    return description, user


def _scan(folders: list[Path], extensions: tuple[str, ...]) -> tuple[list[NetworkEntry], list[Path]]:
    entries: dict[str, NetworkEntry] = {}
    duplicates = []
    for folder in folders:
        root = folder.resolve() if folder.exists() else folder
        for path in list_files([folder], extensions):
            name = path.stem
            if name in entries:
                if entries[name].path != path:
                    duplicates.append(path)
                continue
            description, user = _read_beside(path)
            entries[name] = NetworkEntry(name=name, path=path, root=root, preview=find_preview(path),
                                         description=description, user_metadata=user)
    return sorted(entries.values(), key=lambda e: e.name.lower()), duplicates


class _FileRegistry:
    """The files with `extensions` under `folders`, subfolders included; `refresh()` rescans."""

    extensions: tuple[str, ...] = ()

    def __init__(self, folders: list[Path]):
        self.folders = list(folders)
        self._lock = threading.Lock()
        self.entries: list[NetworkEntry] = []
        self.duplicates: list[Path] = []
        self.refresh()

    def refresh(self) -> None:
        entries, duplicates = _scan(self.folders, self.extensions)
        with self._lock:
            self.entries, self.duplicates = entries, duplicates


class LoraRegistry(_FileRegistry):
    """The LoRA/LyCORIS files under `folders` (models/Lora, --lora-dir, models/LyCORIS), with subfolders."""

    extensions = LORA_EXTENSIONS

    def __init__(self, folders: list[Path]):
        self._metadata: dict[tuple, dict] = {}
        super().__init__(folders)

    def metadata(self, entry: NetworkEntry) -> dict:
        """The file's safetensors metadata (strings), in A1111's order; {} for other files or unreadable ones."""
        if entry.path.suffix.lower() != ".safetensors":
            return {}
        try:
            key = (str(entry.path), entry.stamp)
        except OSError:
            return {}
        with self._lock:
            cached = self._metadata.get(key)
        if cached is None:
            try:
                raw = read_safetensors_metadata(entry.path)
            except UserError:
                raw = {}
            raw.pop("ssmd_cover_images", None)  # images as base64: too big to show as text
            cached = dict(sorted(raw.items(), key=lambda kv: (METADATA_ORDER.get(kv[0], 999), kv[0])))
            with self._lock:
                self._metadata[key] = cached
        return cached

    def alias(self, entry: NetworkEntry) -> str:
        return str(self.metadata(entry).get("ss_output_name") or entry.name)

    def find(self, name: str) -> NetworkEntry | None:
        """By file name, then by alias (`ss_output_name`), then ignoring case."""
        with self._lock:
            entries = list(self.entries)
        for e in entries:
            if e.name == name:
                return e
        for e in entries:
            if e.path.suffix.lower() == ".safetensors" and self.alias(e) == name:
                return e
        lowered = name.lower()
        for e in entries:
            if e.name.lower() == lowered:
                return e
        return None

    def find_or_refresh(self, name: str) -> NetworkEntry | None:
        """`find`, rescanning the folders once when the name is not (or no longer) there."""
        entry = self.find(name)
        if entry is None or not entry.path.is_file():
            self.refresh()
            entry = self.find(name)
        return entry


class HypernetworkRegistry(_FileRegistry):
    """A1111's hypernetworks: the `.pt` files under models/hypernetworks (and --hypernetwork-dir), with subfolders."""

    extensions = HYPERNETWORK_EXTENSIONS

    def find(self, name: str) -> NetworkEntry | None:
        """By file name (without extension), then ignoring case."""
        with self._lock:
            entries = list(self.entries)
        exact = next((e for e in entries if e.name == name), None)
        return exact or next((e for e in entries if e.name.lower() == name.lower()), None)

    def find_or_refresh(self, name: str) -> NetworkEntry | None:
        entry = self.find(name)
        if entry is None or not entry.path.is_file():
            self.refresh()
            entry = self.find(name)
        return entry


class EmbeddingRegistry(_FileRegistry):
    """The textual-inversion files under `folder` (embeddings/ or --embeddings-dir), with subfolders."""

    extensions = EMBEDDING_EXTENSIONS

    def __init__(self, folder: Path):
        super().__init__([folder])

    @property
    def folder(self) -> Path:
        return self.folders[0]

    @folder.setter
    def folder(self, value: Path) -> None:
        self.folders = [value]

    def find(self, name: str) -> NetworkEntry | None:
        with self._lock:
            return next((e for e in self.entries if e.name == name), None)


# -- hashes -----------------------------------------------------------------------------------------
def addnet_hash(path: Path) -> str:
    """kohya's hash of a `.safetensors` file: sha256 of everything after the 8-byte length and the header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NetworkHashes:
    """A1111's LoRA and embedding hashes, cached on disk by (path, size, mtime)."""

    def __init__(self, cache_file: Path | None):
        self.cache_file = cache_file
        self._memory: dict[str, dict] = {}

    def _load(self) -> dict:
        if self.cache_file is None:
            return self._memory
        try:
            return json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def _cached(self, path: Path, kind: str, compute) -> str:
        st = os.stat(path)
        key, stamp = f"{kind}:{path}", f"{st.st_size}:{st.st_mtime_ns}"
        entry = self._load().get(key)
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
        value = compute(path)
        with _LOCK:
            data = self._load()
            data[key] = {"sha256": value, "stamp": stamp}
            if self.cache_file is None:
                self._memory = data
            else:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
                tmp.replace(self.cache_file)
        return value

    def lora_hash(self, path: Path, metadata: dict | None = None) -> str:
        """The full hash A1111 records for a LoRA file."""
        given = (metadata or {}).get("sshs_model_hash")
        if isinstance(given, str) and len(given) >= 12:
            return given.lower()
        if Path(path).suffix.lower() == ".safetensors":
            return self._cached(Path(path), "addnet", addnet_hash)
        return self._cached(Path(path), "sha256", file_sha256)

    def embedding_hash(self, path: Path) -> str:
        return self._cached(Path(path), "sha256", file_sha256)


def short_hash(full: str) -> str:
    return full[:12]


def detect_family(metadata: dict, parts: set[str]) -> str | None:
    """The base model a LoRA was trained for, from kohya's metadata (FLUX/SD3 too) or SDXL's second text encoder;
    None if unknown."""
    base = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if base.startswith("flux") or arch.startswith("flux-1"):
        return "flux"
    if base.startswith("sd3") or arch.startswith("stable-diffusion-v3"):
        return "sd3"
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if base.startswith("sd_v2") or str(metadata.get("ss_v2", "")) == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if "te2" in parts:
        return "sdxl"
    return None
