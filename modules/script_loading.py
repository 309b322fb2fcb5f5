"""Loading an extension's script file (A1111's `modules.script_loading.load_module`) and the Easel side of a
script call: which `Script` classes a file defines, the callbacks it registered, and `ScriptCall`, the picklable
description of one script's use in a job that the app sends to the backend.

Both processes load a script file: the app to read `title`, `show` and `ui`; the backend, fresh for each job that
uses it, to call `run`, `process`, `postprocess_image` and its callbacks. Nothing is kept between jobs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from modules.script_callbacks import CallbackRegistry

__all__ = ["load_module", "ScriptFile", "ScriptCall", "load_script_file"]


@dataclass
class _Loading:
    basedir: str
    registry: CallbackRegistry


_loading: ContextVar[_Loading | None] = ContextVar("a1111_script_loading", default=None)


def loading_basedir() -> str:
    loading = _loading.get()
    if loading is None:
        raise RuntimeError("modules.scripts.basedir() is only available while a script file is being loaded.")
    return loading.basedir


def loading_registry(what: str) -> CallbackRegistry:
    loading = _loading.get()
    if loading is None:
        raise RuntimeError(f"modules.script_callbacks.{what} must be called when the script file is imported.")
    return loading.registry


def load_module(path: str | Path) -> ModuleType:
    """Import the file as a module of its own (a name made from its path), as A1111 loads extension scripts."""
    path = Path(path)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"easel_extension_script_{digest}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@dataclass
class ScriptFile:
    """A loaded script file: its module, the `Script` subclasses it defines (in order), its callbacks."""

    path: Path
    module: ModuleType
    classes: list[type]
    callbacks: CallbackRegistry = field(default_factory=CallbackRegistry)

    def instance(self, title: str, img2img: bool):
        """A fresh instance of the file's script whose `title()` is `title`, set up for the tab."""
        for cls in self.classes:
            script = cls()
            script.filename = str(self.path)
            script.is_img2img, script.is_txt2img = img2img, not img2img
            if script.title() == title:
                return script
        raise LookupError(f"{self.path.name} no longer defines a script titled {title!r}")


def load_script_file(path: str | Path, extension_dir: str | Path | None = None) -> ScriptFile:
    """Import a script file (its callbacks registered into its own registry) and find its `Script` classes."""
    from modules.scripts import Script

    path = Path(path)
    loading = _Loading(str(extension_dir or path.parent.parent), CallbackRegistry())
    token = _loading.set(loading)
    try:
        module = load_module(path)
    finally:
        _loading.reset(token)
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script
               and obj.__module__ == module.__name__]
    return ScriptFile(path, module, classes, loading.registry)


@dataclass(frozen=True)
class ScriptCall:
    """One A1111 script's use in a job, as the app sends it: the file, the script's title, the tab, the checked
    positional arguments (`script_args`, or the `alwayson_scripts` entry's `args`)."""

    path: str
    title: str
    img2img: bool
    args: tuple
    always_on: bool = False
