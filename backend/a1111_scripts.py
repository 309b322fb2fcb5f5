"""The app side of AUTOMATIC1111 scripts kept in extensions (`extensions/NAME/scripts/*.py`, and the data dir's
`extensions/` with --data-dir): each file is loaded through the compatibility layer (`modules/`), its `Script`
classes asked for `title()`, `show(is_img2img)` and `ui(is_img2img)`, and turned into Easel's interfaces:

- a script that shows in a tab becomes a selectable script there (`ScriptSpec`: the Script dropdown, `script_name`
  + positional `script_args`, /sdapi/v1/scripts and /script-info), its arguments the controls `ui()` returns, in
  that order (gr.Slider, Checkbox, Dropdown, Radio, Textbox, Number, CheckboxGroup; gr.HTML/Markdown are text);
- an `AlwaysVisible` script becomes an always-on script (`alwayson_scripts: {title: {"args": [...]}}`).

The job then carries a `ScriptCall` (file, title, tab, checked arguments); the backend loads the file again and
runs the script (`backend/engine/scripts/a1111.py`, `backend/engine/a1111_always_on.py`). A file that fails to
load (an ImportError, a name the layer lacks, a control it cannot map) is logged with its path and skipped; the
rest loads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.core.errors import UserError
from backend.core.scripts_catalog import TABS, PreparedScript, ScriptArg, ScriptSpec

log = logging.getLogger("easel")



def _choices(component) -> tuple:
    return tuple(c[1] if isinstance(c, (tuple, list)) else c for c in (getattr(component, "choices", None) or ()))


def component_arg(component, index: int, where: str) -> ScriptArg:
    """The ScriptArg for one Gradio component a script's `ui()` returned."""
    kind = type(component).__name__
    label = getattr(component, "label", None) or f"Argument {index}"
    key = f"arg{index}"
    value = getattr(component, "value", None)
    if kind == "Slider":
        return ScriptArg(key, label, "slider", value, minimum=component.minimum, maximum=component.maximum,
                         step=component.step)
    if kind == "Checkbox":
        return ScriptArg(key, label, "checkbox", bool(value))
    if kind == "Number":
        precision = getattr(component, "precision", None)
        return ScriptArg(key, label, "number", value, minimum=component.minimum, maximum=component.maximum,
                         step=1 if precision == 0 else None)
    if kind in ("Dropdown", "Radio"):
        choices = _choices(component)
        if getattr(component, "multiselect", False):
            return ScriptArg(key, label, "checkboxgroup", list(value or []), choices=choices)
        index_type = getattr(component, "type", "value") == "index"
        default = choices.index(value) if index_type and value in choices else value
        return ScriptArg(key, label, kind.lower(), default, choices=choices, index=index_type)
    if kind == "CheckboxGroup":
        return ScriptArg(key, label, "checkboxgroup", list(value or []), choices=_choices(component))
    if kind == "Textbox":
        return ScriptArg(key, label, "textbox", value or "", lines=int(getattr(component, "lines", 1) or 1))
    if kind in ("HTML", "Markdown"):
        return ScriptArg(key, str(value or ""), "info", value)
    raise TypeError(f"{where}: ui() returned a gr.{kind}, which Easel's AUTOMATIC1111 compatibility layer cannot "
                    "offer as a script argument (supported: Slider, Checkbox, Number, Dropdown, Radio, "
                    "CheckboxGroup, Textbox, HTML, Markdown).")


def _ui_args(script, img2img: bool, where: str) -> tuple[ScriptArg, ...]:
    import gradio as gr  # the app process builds the UI with Gradio; the script's ui() makes its components

    with gr.Blocks():  # a scratch Blocks: the components are read, Easel renders its own from the specs
        components = script.ui(img2img)
    return tuple(component_arg(c, i, where) for i, c in enumerate(components or []))


@dataclass
class LoadedScript:
    """One `Script` class of a file, as the app knows it: title, file, per tab (shown in it) its arguments."""

    title: str
    path: Path
    always_on: bool
    args: dict[str, tuple[ScriptArg, ...]] = field(default_factory=dict)  # tab -> arguments


class ExtensionScript:
    """An `AlwaysVisible` A1111 script in the always-on registry (`backend.always_on_scripts`)."""

    def __init__(self, loaded: LoadedScript):
        self.loaded = loaded
        self.name = loaded.title.strip().lower()

    def for_job(self, entry: Any, *, img2img: bool):
        loaded = self.loaded
        tab = "img2img" if img2img else "txt2img"
        if tab not in loaded.args:
            raise UserError(f"always on script {loaded.title} does not run in {tab}.", status=422)
        if isinstance(entry, dict):
            values = entry.get("args", [])
        elif isinstance(entry, list):
            values = entry
        else:
            raise UserError(f"alwayson_scripts[{loaded.title!r}] must be {{\"args\": [...]}}, got {entry!r}.",
                            status=422)
        spec = ScriptSpec(loaded.title, (tab,), loaded.args[tab], engine=True)
        from modules.script_loading import ScriptCall
        return ScriptCall(str(loaded.path), loaded.title, img2img, tuple(spec.check_args(values)), always_on=True)


class ExtensionScripts:
    """The A1111 scripts of the extensions' script files, loaded in the app process."""

    def __init__(self, files: list[tuple[Path, Path]], options: dict, cmd_opts=None, taken: set[str] = frozenset()):
        self.scripts: list[LoadedScript] = []
        self.failures: dict[str, str] = {}  # file -> why it was skipped
        for path, extension in files:
            try:
                self.scripts += self._load(path, extension, options, cmd_opts, taken)
            except Exception as exc:  # noqa: BLE001  a broken extension never stops the app
                message = f"{type(exc).__name__}: {exc}"
                self.failures[str(path)] = message
                log.error("extension script %s (extension %s) skipped: %s", path, extension.name, message)
            taken = taken | {s.title.lower() for s in self.scripts}

    @staticmethod
    def _load(path: Path, extension: Path, options: dict, cmd_opts, taken) -> list[LoadedScript]:
        from modules.context import ScriptContext, running
        from modules.script_loading import UNSUPPORTED_METHODS, load_script_file
        from modules.scripts import AlwaysVisible, Script

        loaded = []
        with running(ScriptContext(options=options, cmd_opts=cmd_opts, where=str(path))):
            script_file = load_script_file(path, extension)
            if script_file.callbacks.cfg_denoiser and not script_file.classes:
                raise ValueError("it registers on_cfg_denoiser callbacks but defines no Script: Easel runs a file's "
                                 "callbacks in the jobs that use one of its scripts, so they would never run")
            for cls in script_file.classes:
                script = cls()
                script.filename = str(path)
                title = script.title()
                where = f"script {title!r} in {path}"
                if title.strip().lower() in taken or title.strip().lower() in [s.title.lower() for s in loaded]:
                    raise ValueError(f"{where}: a script titled {title!r} already exists")
                entry = LoadedScript(title, path, always_on=False)
                for tab in TABS:
                    img2img = tab == "img2img"
                    script.is_img2img, script.is_txt2img = img2img, not img2img
                    shown = script.show(img2img)
                    if shown is AlwaysVisible:
                        entry.always_on = True
                    elif not shown:
                        continue
                    entry.args[tab] = _ui_args(script, img2img, where)
                unsupported = [m for m in UNSUPPORTED_METHODS if getattr(cls, m) is not getattr(Script, m)]
                if entry.always_on and unsupported:  # it would run in every job: skipped rather than half-run
                    log.error("extension script %r in %s skipped: it overrides %s, which Easel's AUTOMATIC1111 "
                              "compatibility layer does not call yet", title, path, ", ".join(unsupported))
                    continue
                loaded.append(entry)
        return loaded

    def selectable_specs(self) -> list[ScriptSpec]:
        """One ScriptSpec per selectable script and tab (ui() may differ between tabs)."""
        specs = []
        for loaded in self.scripts:
            if loaded.always_on:
                continue
            for tab, args in loaded.args.items():
                specs.append(ScriptSpec(loaded.title, (tab,), args, engine=True, prepare=_prepare_for(loaded, tab),
                                        description=f"From {loaded.path.parent.parent.name}/scripts/{loaded.path.name}."))
        return specs

    def always_on(self) -> list[ExtensionScript]:
        return [ExtensionScript(s) for s in self.scripts if s.always_on]

    def always_on_specs(self, tab: str) -> list[ScriptSpec]:
        """The AlwaysVisible scripts of a tab as specs (their controls in the tab, in their own accordion)."""
        return [ScriptSpec(s.title, (tab,), s.args[tab], engine=True) for s in self.scripts
                if s.always_on and tab in s.args]

    def always_on_tabs(self) -> dict[str, bool]:
        """{name: runs in txt2img too} (the shape of `ignored_inputs.ALWAYSON_SCRIPTS`)."""
        return {s.title.strip().lower(): "txt2img" in s.args for s in self.scripts if s.always_on and s.args}


def _prepare_for(loaded: LoadedScript, tab: str):
    def prepare(req, values: dict) -> PreparedScript:
        from modules.script_loading import ScriptCall
        return PreparedScript(args=ScriptCall(str(loaded.path), loaded.title, tab == "img2img",
                                              tuple(values.values())))
    return prepare
