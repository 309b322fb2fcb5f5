"""Finding checkpoint and VAE files, naming and hashing them as AUTOMATIC1111 does.

Titles read `name.safetensors [abcdef1234]`, where the bracket holds the first
10 hex digits of the file's sha256 (once it has been computed; hashes are cached
in `cache/hashes.json` keyed by path, size and modification time).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import CHECKPOINT_EXTENSIONS, VAE_EXTENSIONS, list_files

_HASH_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelFile:
    """A model file on disk; `name` is its path relative to the folder it was found in."""

    name: str
    path: Path
    sha256: str | None = None

    @property
    def model_name(self) -> str:
        # A1111: the name without extension, with folder separators turned into "_".
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name


class HashCache:
    """sha256 of files, cached on disk by (path, size, mtime). Safe to share between processes."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file

    def _load(self) -> dict:
        try:
            return json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _key(path: Path) -> tuple[str, str]:
        st = path.stat()
        return str(path), f"{st.st_size}:{int(st.st_mtime)}"

    def cached(self, path: Path) -> str | None:
        try:
            key, stamp = self._key(path)
        except OSError:
            return None
        entry = self._load().get(key)
        return entry["sha256"] if entry and entry.get("stamp") == stamp else None

    def sha256(self, path: Path) -> str:
        found = self.cached(path)
        if found:
            return found
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        key, stamp = self._key(path)
        with _HASH_LOCK:
            data = self._load()
            data[key] = {"sha256": value, "stamp": stamp}
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            tmp.replace(self.cache_file)
        return value


def _scan(folders: list[Path], extensions: tuple[str, ...], hashes: HashCache, exclude_vae: bool) -> list[ModelFile]:
    found = []
    for folder in folders:
        for path in list_files([folder], extensions):
            if exclude_vae and (".vae." in path.name.lower()):
                continue
            rel = path.relative_to(folder.resolve()) if folder.resolve() in path.parents else Path(path.name)
            found.append(ModelFile(name=str(rel), path=path, sha256=hashes.cached(path)))
    # A file reachable from two folders appears once.
    unique = {}
    for f in found:
        unique.setdefault(f.path, f)
    return sorted(unique.values(), key=lambda f: f.name.lower())


class ModelRegistry:
    """The checkpoints and VAEs on disk. `refresh()` rescans; lookups accept names, titles, stems and hashes."""

    def __init__(self, ckpt_dirs: list[Path], vae_dirs: list[Path], hashes: HashCache):
        self.ckpt_dirs = ckpt_dirs
        self.vae_dirs = vae_dirs
        self.hashes = hashes
        self._lock = threading.Lock()
        self.checkpoints: list[ModelFile] = []
        self.vaes: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        ckpts = _scan(self.ckpt_dirs, CHECKPOINT_EXTENSIONS, self.hashes, exclude_vae=True)
        vaes = _scan(self.vae_dirs, VAE_EXTENSIONS, self.hashes, exclude_vae=False)
        with self._lock:
            self.checkpoints, self.vaes = ckpts, vaes

    def with_hash(self, f: ModelFile) -> ModelFile:
        """The same file with its sha256 filled in (computing it when not cached)."""
        if f.sha256:
            return f
        return ModelFile(name=f.name, path=f.path, sha256=self.hashes.sha256(f.path))

    def find_checkpoint(self, query: str | None) -> ModelFile:
        with self._lock:
            ckpts = list(self.checkpoints)
        if not ckpts:
            folders = ", ".join(str(d) for d in self.ckpt_dirs)
            raise UserError(f"No Stable Diffusion checkpoint found. Put a .safetensors or .ckpt file in {folders} and press refresh.", status=404)
        if not query:
            return ckpts[0]
        q = query.strip()
        for f in ckpts:
            if q in (f.title, f.name, f.model_name, str(f.path)):
                return f
        bare = q.split(" [")[0].strip()
        for f in ckpts:
            if bare in (f.name, f.model_name, Path(f.name).name, Path(f.model_name).name):
                return f
        for f in ckpts:
            if f.sha256 and (q == f.shorthash or q == f.sha256 or q.endswith(f"[{f.shorthash}]")):
                return f
        raise UserError(f"Checkpoint {query!r} not found. Available: {', '.join(f.title for f in ckpts)}", status=404)

    def find_vae(self, query: str) -> ModelFile:
        with self._lock:
            vaes = list(self.vaes)
        for f in vaes:
            if query in (f.name, f.model_name, Path(f.name).name, f.title):
                return f
        raise UserError(f"VAE {query!r} not found. Available: Automatic, None, {', '.join(f.name for f in vaes)}", status=404)

    def vae_for(self, checkpoint: ModelFile, choice: str | None, vae_path_flag: str | None = None) -> Path | None:
        """The VAE file to use with `checkpoint` for the setting `choice` (Automatic / None / a file)."""
        if choice in (None, "", "Automatic", "auto"):
            if vae_path_flag:
                return Path(vae_path_flag)
            stem = checkpoint.path.with_suffix("")
            for ext in (".vae.safetensors", ".vae.pt", ".vae.ckpt"):
                candidate = Path(str(stem) + ext)
                if candidate.exists():
                    return candidate
            return None
        if choice == "None":
            return None
        return self.find_vae(choice).path
