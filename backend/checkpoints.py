"""Finding checkpoint and VAE files, naming and hashing them as AUTOMATIC1111 does.

Titles read `name.safetensors [abcdef1234]`, where the bracket holds the first
10 hex digits of the file's sha256 (once it has been computed; hashes are cached
in `cache/hashes.json` keyed by path, size and modification time).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import UserError
from backend.core.paths import CHECKPOINT_EXTENSIONS, VAE_EXTENSIONS, list_files

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

    def cached_many(self, paths: list[Path]) -> dict[Path, str]:
        """The cached sha256 of each of `paths` that has one (the cache file read once)."""
        data = self._load()
        found = {}
        for path in paths:
            try:
                key, stamp = self._key(path)
            except OSError:
                continue
            entry = data.get(key)
            if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
                found[path] = entry["sha256"]
        return found

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


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def quick_file_problem(path: Path) -> str | None:
    """A cheap look at a checkpoint file's framing, without torch: why it cannot load (garbage, an incomplete
    download, a file of another kind), or None when it may. Loading it is still the real test."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix.lower() == ".safetensors":
                if len(head) < 8:
                    return "the file is too short to be a .safetensors file"
                (length,) = struct.unpack("<Q", head)
                if not 2 <= length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                    return "it is not a valid .safetensors file (corrupt or incomplete download?)"
                header = json.loads(f.read(length).decode("utf-8"))
                if not isinstance(header, dict):
                    return "it is not a valid .safetensors file (its header is not a JSON object)"
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                if ends and 8 + length + max(ends) > size:
                    return "the file is truncated (incomplete download?)"
                return None
        if path.suffix.lower() == ".gguf":  # a quantized FLUX.1 / SD3 transformer
            return None if head.startswith(b"GGUF") else "it is not a valid GGUF file (corrupt or incomplete download?)"
        if head.startswith(b"PK\x03\x04"):
            return None if zipfile.is_zipfile(path) else "the file is truncated (incomplete download?)"
        if head[:1] == b"\x80":  # a pickle (PyTorch's legacy format)
            return None
        return "it is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    except OSError as exc:
        return f"it could not be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError):
        return "it is not a valid .safetensors file (its header is malformed)"


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
        # Why files failed to load, by path: (size, mtime) when it failed, message. A changed file is tried again.
        self._unloadable: dict[Path, tuple[tuple[int, int] | None, str]] = {}
        self._framing: dict[Path, tuple[tuple[int, int] | None, str | None]] = {}  # quick_file_problem's answers
        self.refresh()

    def refresh(self) -> None:
        ckpts = _scan(self.ckpt_dirs, CHECKPOINT_EXTENSIONS, self.hashes, exclude_vae=True)
        vaes = _scan(self.vae_dirs, VAE_EXTENSIONS, self.hashes, exclude_vae=False)
        with self._lock:
            self.checkpoints, self.vaes = ckpts, vaes
            self._unloadable.clear()  # a refresh tries the files that failed to load again

    def fill_cached_hashes(self) -> None:
        """Give the listed files whose hash was computed since the scan (by the backend when it loaded them, or
        `with_hash`) their sha256, so that titles read `name [hash]` as soon as it is known (A1111's)."""
        with self._lock:
            missing = [f.path for f in self.checkpoints + self.vaes if not f.sha256]
        if not missing:
            return
        found = self.hashes.cached_many(missing)
        if not found:
            return

        def filled(files: list[ModelFile]) -> list[ModelFile]:
            return [ModelFile(name=f.name, path=f.path, sha256=found[f.path]) if not f.sha256 and f.path in found
                    else f for f in files]

        with self._lock:
            self.checkpoints, self.vaes = filled(self.checkpoints), filled(self.vaes)

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

    def mark_unloadable(self, path: Path, message: str) -> None:
        """Remember that `path` failed to load (until the file changes): the automatic choice passes over it."""
        with self._lock:
            self._unloadable[Path(path)] = (_stamp(Path(path)), message)

    def problem_with(self, f: ModelFile) -> str | None:
        """Why `f` cannot be the automatic default: it failed to load before, or its framing is broken
        (looked at once per version of the file)."""
        stamp = _stamp(f.path)
        with self._lock:
            known = self._unloadable.get(f.path)
            checked = self._framing.get(f.path)
        if known is not None and known[0] == stamp:
            return known[1]
        if checked is not None and checked[0] == stamp:
            return checked[1]
        problem = quick_file_problem(f.path)
        with self._lock:
            self._framing[f.path] = (stamp, problem)
        return problem

    def automatic_choice(self) -> tuple[list[ModelFile], list[str]]:
        """The checkpoints to try, in order, when the user chose none (setting `sd_model_checkpoint` empty or
        gone): the first file by name without a known problem, then the ones after it (tried only if it fails to
        load); and a warning for each file passed over. When every file has a problem, all are tried in order
        (the job then fails with the loader's own message)."""
        with self._lock:
            ckpts = list(self.checkpoints)
        if not ckpts:
            self.find_checkpoint(None)  # raises the "no checkpoint" error
        notes = []
        for i, f in enumerate(ckpts):
            problem = self.problem_with(f)
            if problem is None:
                return ckpts[i:], notes
            notes.append(f"Checkpoint {f.name} was skipped: {problem}.")
        return ckpts, []

    def find_vae(self, query: str) -> ModelFile:
        with self._lock:
            vaes = list(self.vaes)
        for f in vaes:
            if query in (f.name, f.model_name, Path(f.name).name, f.title):
                return f
        raise UserError(f"VAE {query!r} not found. Available: Automatic, None, {', '.join(f.name for f in vaes)}", status=404)

    def vae_for(self, checkpoint: ModelFile, choice: str | None, vae_path_flag: str | None = None,
                settings_override_preferences: bool = True) -> Path | None:
        """The VAE file to use with `checkpoint` for the setting `choice` (Automatic / None / a file), as A1111's
        `sd_vae.resolve_vae`: a VAE chosen in settings wins when `settings_override_preferences` (the setting
        `sd_vae_overrides_per_model_preferences`); else the checkpoint's own preference (`"vae"` in its user
        metadata `NAME.json` beside it), then a `NAME.vae.*` file beside it, then the choice."""
        explicit = choice not in (None, "", "Automatic", "auto")
        if not explicit and vae_path_flag:
            return Path(vae_path_flag)
        if explicit and settings_override_preferences:
            return None if choice == "None" else self.find_vae(choice).path
        preferred = checkpoint_vae_preference(checkpoint.path)
        if preferred == "None":
            return None
        if preferred is not None:
            try:
                return self.find_vae(preferred).path
            except UserError:
                pass  # a VAE no longer on disk: as A1111, the preference is passed over
        stem = checkpoint.path.with_suffix("")
        for ext in (".vae.safetensors", ".vae.pt", ".vae.ckpt"):
            candidate = Path(str(stem) + ext)
            if candidate.exists():
                return candidate
        if explicit:
            return None if choice == "None" else self.find_vae(choice).path
        return None


def checkpoint_vae_preference(path: Path) -> str | None:
    """The VAE a checkpoint's user metadata (A1111's `NAME.json` beside it, edited on its Extra Networks card)
    prefers: a VAE name, "None", or None when it names none (or "Automatic")."""
    try:
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vae = data.get("vae") if isinstance(data, dict) else None
    return vae if isinstance(vae, str) and vae.strip() and vae != "Automatic" else None
