"""Easel's native extension API: an extension folder's `easel_extension.py` with `register(registry)`.

`register` receives an `ExtensionRegistry` (made by the caller, never a global) and declares what the extension
adds; nothing runs at declaration. Both processes read the same files: the app process reads everything
(`load_registry` over the enabled extensions), the backend process reads them again at start and uses only the
engine parts (`engine_tables`: always-on scripts' engine modules and job kinds, as module paths). Declarations
refer to code by callables taking the app's service, or by module path for the engine, so loading a file imports
neither torch nor Gradio. Standard library only. The guide is docs/extensions.md.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("easel.extensions")

EXTENSION_FILE = "easel_extension.py"


@dataclass(frozen=True)
class AlwaysOnDecl:
    """An always-on script (`alwayson_scripts: {name: {"args": [...]}}`): `app(service)` makes the app-side part
    (`name`, `for_job(entry, img2img=...)`, see backend/always_on_scripts.py); `engine` is the module path of the
    engine part (`prepare(args, job, ctx, runtime)`, optionally `runtime(policy, models_dir)`)."""

    name: str
    app: Callable[[Any], Any]
    engine: str  # a module path, or the absolute path of a .py file in the extension's folder
    txt2img: bool = True  # img2img always; txt2img too unless False (A1111 answers 422 for it in txt2img then)


@dataclass(frozen=True)
class JobDecl:
    """A job kind of the extension's own: the engine calls `function(payload, runtime)` of `script`'s engine
    module (with that script's runtime)."""

    kind: str
    script: str
    function: str


@dataclass(frozen=True)
class TabDecl:
    title: str
    elem_id: str
    build: Callable[[Any], Any]  # build(service), inside the tab's `gr.Tab` context


@dataclass
class ExtensionRegistry:
    """What the extensions' `register(registry)` declared, extension by extension."""

    components: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # key -> make(service)
    always_on: list[AlwaysOnDecl] = field(default_factory=list)
    jobs: list[JobDecl] = field(default_factory=list)
    routers: list[Callable[..., Any]] = field(default_factory=list)  # build(service, dependencies, log_requests)
    generation_ui: list[Callable[..., Any]] = field(default_factory=list)  # build(service, tab, **context)
    tabs: list[TabDecl] = field(default_factory=list)
    settings: list[Any] = field(default_factory=list)  # backend.core.options.Setting
    xyz_axes: list[Callable[[Any], list]] = field(default_factory=list)  # build(service) -> [xyz_axes.AxisType]
    loaded: list[str] = field(default_factory=list)  # extension names whose register() ran
    current: str = ""  # the extension being registered (log messages)
    folder: Path | None = None  # its folder (an engine part given as a file is relative to it)

    # -- what register() calls ------------------------------------------------------------------------------------
    def add_component(self, key: str, make: Callable[[Any], Any]) -> None:
        """What the extension's other parts share in the app process (ControlNet: its model catalog and jobs):
        `make(service)` runs once when the service starts; the parts read it as `service.components[key]`."""
        if key in self.components:
            raise ValueError(f"component {key!r} is already registered")
        self.components[key] = make

    def add_always_on_script(self, name: str, *, app: Callable[[Any], Any], engine: str, txt2img: bool = True) -> None:
        """`engine`: a module path (importable in the backend process, e.g. `backend.engine.controlnet.script`) or
        a `.py` file in the extension's folder (`engine="engine_part.py"`)."""
        key = name.strip().lower()
        if any(d.name == key for d in self.always_on):
            raise ValueError(f"always-on script {name!r} is already registered")
        if engine.endswith(".py"):
            if self.folder is None:
                raise ValueError(f"always-on script {name!r}: an engine file needs the extension's folder")
            file = (self.folder / engine).resolve()
            if self.folder.resolve() not in file.parents or not file.is_file():
                raise ValueError(f"always-on script {name!r}: engine file {engine} is not a file in the extension")
            engine = str(file)
        self.always_on.append(AlwaysOnDecl(key, app, engine, txt2img))

    def add_job_kind(self, kind: str, *, script: str, function: str) -> None:
        self.jobs.append(JobDecl(kind, script.strip().lower(), function))

    def add_api_router(self, build: Callable[..., Any]) -> None:
        """`build(service, dependencies, log_requests)` -> a FastAPI `APIRouter` the app includes."""
        self.routers.append(build)

    def add_generation_ui(self, build: Callable[..., Any]) -> None:
        """`build(service, tab, checkpoint=..., width=..., height=...)`, called in txt2img's and img2img's column
        below the Script dropdown; returns None or a panel with `inputs` (components) and
        `to_request(request, values)` that adds the panel's values to the tab's request."""
        self.generation_ui.append(build)

    def add_tab(self, title: str, build: Callable[[Any], Any], elem_id: str = "") -> None:
        self.tabs.append(TabDecl(title, elem_id or title.lower().replace(" ", "_"), build))

    def add_setting(self, setting: Any) -> None:
        """A `backend.core.options.Setting`: the service adds it to its `Options` (`Options.register`), so it
        passes the one settings gate, is stored in config.json, shown in the Settings tab under its section, listed
        by /sdapi/v1/options and may be a job's `override_settings`, like Easel's own."""
        self.settings.append(setting)

    def add_xyz_axes(self, build: Callable[[Any], list]) -> None:
        """X/Y/Z plot axes (A1111's extensions append theirs to its axis list, after the built-in ones):
        `build(service)` returns `backend.core.xyz_axes.AxisType`s with `script` (the always-on script whose
        `alwayson_scripts` entry they change), `apply(alwayson_scripts, value)` and, for a dropdown, `options()`."""
        self.xyz_axes.append(build)

    # -- what the app and the engine read -------------------------------------------------------------------------
    def engine_scripts(self) -> dict[str, str]:
        return {d.name: d.engine for d in self.always_on}

    def script_jobs(self) -> dict[str, tuple[str, str]]:
        return {d.kind: (d.script, d.function) for d in self.jobs}

    def alwayson_tabs(self) -> dict[str, bool]:
        """{name: runs in txt2img too} (img2img runs every always-on script)."""
        return {d.name: d.txt2img for d in self.always_on}


def load_extension_file(path: Path, name: str, registry: ExtensionRegistry) -> bool:
    """Run one extension's `register(registry)`; a file that fails is logged with the extension's name and
    skipped (what it declared before failing is dropped)."""
    before = (set(registry.components), len(registry.always_on), len(registry.jobs), len(registry.routers), len(registry.generation_ui),
              len(registry.tabs), len(registry.settings), len(registry.xyz_axes))
    module_name = f"easel_extension_{''.join(c if c.isalnum() else '_' for c in name)}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        register = getattr(module, "register", None)
        if not callable(register):
            raise AttributeError(f"{EXTENSION_FILE} has no register(registry) function")
        registry.current, registry.folder = name, path.parent
        register(registry)
    except Exception as exc:  # an extension's bug must not stop the app
        log.error("extension %s skipped: %s: %s", name, type(exc).__name__, exc)
        for key in set(registry.components) - before[0]:
            del registry.components[key]
        for items, count in zip((registry.always_on, registry.jobs, registry.routers, registry.generation_ui,
                                 registry.tabs, registry.settings, registry.xyz_axes), before[1:]):
            del items[count:]
        return False
    finally:
        registry.current, registry.folder = "", None
    registry.loaded.append(name)
    return True


def load_registry(extensions) -> ExtensionRegistry:
    """The registry of the given extensions (`backend.core.extensions.Extension`s) that hold `easel_extension.py`."""
    registry = ExtensionRegistry()
    for ext in extensions:
        path = Path(ext.path) / EXTENSION_FILE
        if path.is_file():
            load_extension_file(path, ext.name, registry)
    return registry


def engine_tables(data_dir: str | Path | None) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """The backend process's view: every extension folder's engine parts ({script: module}, {job kind: (script,
    function)}), enabled or not (the app sends only what its enabled extensions registered)."""
    from backend.core.extensions import discover

    registry = load_registry(discover(data_dir, with_git=False))
    return registry.engine_scripts(), registry.script_jobs()
