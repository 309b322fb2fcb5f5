"""The app side of always-on scripts (A1111's `alwayson_scripts`, e.g. `{"controlnet": {"args": [...]}}`):
the registry of scripts whose arguments the app checks before a job goes to the backend.

Each registered script has a `name` (the request's key, compared without case or surrounding spaces) and
`for_job(entry, img2img=...)`: the request's entry for it, checked (bad input raises `UserError`), turned into
what its engine component needs (picklable, torch-free), or None when it has nothing to do for this job. The
backend's side (`backend.engine.always_on`) prepares each parsed script into sampling hooks. Scripts a pipeline
reads itself ("soft inpainting") stay in the request untouched.
"""
from __future__ import annotations

from typing import Any, Protocol


class AlwaysOnScript(Protocol):
    name: str

    def for_job(self, entry: Any, *, img2img: bool) -> Any | None: ...


class AlwaysOnScripts:
    """The registered scripts, by name."""

    def __init__(self, scripts: list[AlwaysOnScript]):
        self.scripts = {script.name.strip().lower(): script for script in scripts}

    def names(self) -> list[str]:
        return list(self.scripts)

    def for_job(self, alwayson_scripts: dict | None, *, img2img: bool) -> tuple[dict[str, Any], dict]:
        """-> ({name: parsed arguments} for the backend, the request's `alwayson_scripts` without those entries)."""
        parsed: dict[str, Any] = {}
        rest: dict = {}
        for key, entry in (alwayson_scripts or {}).items():
            name = str(key).strip().lower()
            script = self.scripts.get(name)
            result = script.for_job(entry, img2img=img2img) if script is not None and name not in parsed else None
            if result is None:
                rest[key] = entry
            else:
                parsed[name] = result
        return parsed, rest
