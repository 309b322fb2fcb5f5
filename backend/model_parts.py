"""The files of "VAE / Text Encoder" (Forge's list beside the checkpoint): the parts that complete a FLUX.1 or
Stable Diffusion 3 checkpoint.

Files in `models/VAE`, `models/text_encoder` and `models/clip` (and the folders of `--vae-dir` /
`--text-encoder-dir`), listed by their file name as Forge lists them (`GET /sdapi/v1/sd-modules`:
`{model_name: "ae.safetensors", filename: full path}`). The setting `forge_additional_modules` holds the chosen
ones as Forge does, by full path; what a client or an infotext gives (a full path, a path relative to one of the
folders, a file name, or the name without extension as the infotext's `Module 1: ae`) is resolved here, and
nothing outside the folders is accepted. The engine recognises what each file is when it loads it.
"""
from __future__ import annotations

import threading
from pathlib import Path

from backend.checkpoints import ModelFile
from backend.core.errors import UserError
from backend.core.paths import PART_EXTENSIONS, list_files


class ModelParts:
    """The part files on disk; `refresh()` rescans, `resolve()` turns names and paths into the files."""

    def __init__(self, folders: list[Path]):
        self.folders = [Path(f) for f in folders]
        self._lock = threading.Lock()
        self.files: list[ModelFile] = []
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, ModelFile] = {}
        for folder in self.folders:  # a name found in two folders: the first folder's file (models/VAE first)
            for path in list_files([folder], PART_EXTENSIONS):
                found.setdefault(path.name, ModelFile(name=path.name, path=path))
        with self._lock:
            self.files = sorted(found.values(), key=lambda f: f.name.lower())

    def listed(self) -> list[ModelFile]:
        with self._lock:
            return list(self.files)

    def names(self) -> list[str]:
        """The choices of the multi-select: file names, as Forge shows them."""
        return [f.name for f in self.listed()]

    def api_list(self) -> list[dict]:
        """`GET /sdapi/v1/sd-modules` (Forge's): [{model_name, filename}]."""
        return [{"model_name": f.name, "filename": str(f.path)} for f in self.listed()]

    def _roots(self) -> list[Path]:
        return [f.expanduser().resolve() for f in self.folders]

    def find(self, value: str) -> ModelFile:
        """The part file `value` names: a path (absolute, or relative to one of the folders), a file name, or a name
        without extension. 403 for a path outside the folders, 404 for a file that is not there."""
        text = str(value).strip()
        files = self.listed()
        if any(sep in text for sep in ("/", "\\")) or Path(text).expanduser().is_absolute():
            given = Path(text).expanduser()
            roots = self._roots()
            inside = [p for p in ([given.resolve()] if given.is_absolute() else [(r / given).resolve() for r in roots])
                      if any(p == r or r in p.parents for r in roots)]
            if not inside:
                raise UserError(f"VAE / Text Encoder: {text!r} is outside the folders of VAEs and text encoders "
                                f"({', '.join(str(r) for r in roots)}).", status=403)
            for path in inside:
                if path.is_file() and path.name.lower().endswith(PART_EXTENSIONS):
                    return next((f for f in files if f.path == path), ModelFile(name=path.name, path=path))
        else:
            for f in files:
                if text == f.name:
                    return f
            for f in files:
                if text == Path(f.name).stem:
                    return f
        available = ", ".join(f.name for f in files) or "none: put the files in models/VAE or models/text_encoder"
        raise UserError(f"VAE / Text Encoder: {text!r} not found. Available: {available}", status=404)

    def resolve(self, values) -> list[str]:
        """The gate's check of `forge_additional_modules`: each entry a listed file, kept as its full path (Forge's
        form), in the order given, each once."""
        out: list[str] = []
        for value in values or []:
            path = str(self.find(value).path)
            if path not in out:
                out.append(path)
        return out

    def chosen_files(self, values) -> tuple[list[ModelFile], list[str]]:
        """The files a job uses for the setting's `values` (stored earlier: a file may have gone since), and a
        warning for each that is no longer there."""
        files, notes = [], []
        for value in values or []:
            try:
                f = self.find(value)
            except UserError as exc:
                notes.append(f"{exc.message} It was left out.")
                continue
            if f not in files:
                files.append(f)
        return files, notes
