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
from typing import TYPE_CHECKING, Any

from backend.core.errors import UserError
from backend.core.scripts_catalog import TABS, PreparedScript, ScriptArg, ScriptSpec

if TYPE_CHECKING:
    from modules.script_callbacks import FileCallbacks

log = logging.getLogger("easel")



_KINDS = ("Slider", "Checkbox", "Number", "Dropdown", "Radio", "CheckboxGroup", "Textbox", "HTML", "Markdown")


def _choices(component) -> tuple:
    return tuple(c[1] if isinstance(c, (tuple, list)) else c for c in (getattr(component, "choices", None) or ()))


def component_arg(component, index: int, where: str) -> ScriptArg:
    """The ScriptArg for one Gradio component a script's `ui()` returned (a subclass, as A1111's `ui_components`:
    `InputAccordion` is a Checkbox, `DropdownMulti` a Dropdown, as the Gradio class it derives from)."""
    kind = next((c.__name__ for c in type(component).__mro__ if c.__name__ in _KINDS), type(component).__name__)
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


def setting_of(key: str, info, extension: str):
    """The Easel `Setting` for an extension's `shared.opts.add_option(key, shared.OptionInfo(...))`: its kind from
    the default's type, the range and choices from the component's arguments, the section's title."""
    from backend.core.options import Setting

    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"opts.add_option: {key!r} is not a setting name (letters, digits, underscores)")
    default = info.default
    kind = next((t for t in (bool, int, float, str) if type(default) is t), None)
    if kind is None:
        raise ValueError(f"opts.add_option({key!r}): the default {default!r} is not a bool, number or string, "
                         "which Easel's settings hold")
    args = info.component_args() if callable(info.component_args) else dict(info.component_args or {})
    choices = args.get("choices")
    if choices is not None:
        choices = tuple(c[1] if isinstance(c, (tuple, list)) else c for c in choices)
    section = info.section[1] if isinstance(info.section, (tuple, list)) and len(info.section) > 1 else extension
    minimum, maximum = args.get("minimum"), args.get("maximum")
    if kind is int and isinstance(args.get("step"), float) and not float(args["step"]).is_integer():
        kind = float  # a slider of fractions whose default happens to be whole
    return Setting(key, float(default) if kind is float else default, str(info.label or key), str(section or extension),
                   kind, choices=choices, minimum=minimum if kind in (int, float) else None,
                   maximum=maximum if kind in (int, float) else None)


class ExtensionScripts:
    """The A1111 scripts of the extensions' script files, loaded in the app process."""

    def __init__(self, files: list[tuple[Path, Path]], options: dict, cmd_opts=None, taken: set[str] = frozenset(),
                 models=None):
        from modules.script_callbacks import FileCallbacks

        self.scripts: list[LoadedScript] = []
        self.failures: dict[str, str] = {}  # file -> why it was skipped
        self.callbacks: list[FileCallbacks] = []  # the script_callbacks each loaded file registered
        self.cmd_opts = cmd_opts
        self.models = models  # the app's ModelRegistry: `modules.sd_models` (None: not offered)
        for path, extension in files:
            try:
                scripts, callbacks = self._load(path, extension, options, cmd_opts, taken,
                                                self._model_fields(lambda: options))
                self.scripts += scripts
                self.callbacks.append(FileCallbacks(path, extension.name, callbacks))
            except Exception as exc:  # noqa: BLE001  a broken extension never stops the app
                message = f"{type(exc).__name__}: {exc}"
                self.failures[str(path)] = message
                log.error("extension script %s (extension %s) skipped: %s", path, extension.name, message)
            taken = taken | {s.title.lower() for s in self.scripts}

    def _model_fields(self, options) -> dict:
        """`modules.sd_models` in the app process: the checkpoints on disk, the one `sd_model_checkpoint` selects
        (`options()`: the settings to read it from)."""
        if self.models is None:
            return {}
        from modules.sd_models import CheckpointInfo

        registry = self.models

        def selected():
            try:
                return CheckpointInfo.of(registry.find_checkpoint(options().get("sd_model_checkpoint") or None))
            except UserError:
                return None

        return {"checkpoints": lambda: [CheckpointInfo.of(f) for f in registry.checkpoints],
                "selected_checkpoint": selected}

    @staticmethod
    def _load(path: Path, extension: Path, options: dict, cmd_opts, taken, model_fields: dict):
        from modules.context import ScriptContext, running
        from modules.script_loading import load_script_file
        from modules.scripts import AlwaysVisible

        loaded = []
        with running(ScriptContext(options=options, cmd_opts=cmd_opts, where=str(path), **model_fields)):
            script_file = load_script_file(path, extension)
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
                loaded.append(entry)
        return loaded, script_file.callbacks

    # -- script_callbacks (app side) ---------------------------------------------------------------
    def _call(self, name: str, args: tuple = (), options: Any = None, add_option=None) -> list:
        """Each file's `name` callbacks, with the file's extension in the log when one raises (skipped)."""
        from modules.context import ScriptContext, running
        from modules.script_callbacks import call_each

        results = []
        for file in self.callbacks:
            callbacks = getattr(file.registry, name)
            if not callbacks:
                continue
            opts = options.as_dict() if options is not None else {}
            context = ScriptContext(options=opts, cmd_opts=self.cmd_opts, where=file.where,
                                    add_option=(lambda key, info, f=file: add_option(key, info, f))
                                    if add_option else None, **self._model_fields(lambda o=opts: o))
            with running(context):
                results += [(file, r) for r in call_each(callbacks, args, f"on_{name} of {file.where}")]
        return results

    def register_settings(self, options) -> None:
        """`on_ui_settings`: the options the callbacks add join `options`' table (the Settings tab,
        /sdapi/v1/options, the settings gate, `shared.opts.KEY` in both processes). Called once at start-up."""
        def add(key, info, file: FileCallbacks):
            options.register(setting_of(key, info, file.extension))
            if callable(getattr(info, "onchange", None)):
                self._call_onchange_when_changed(options, key, info.onchange, file)
        self._call("ui_settings", options=options, add_option=add)

    def _call_onchange_when_changed(self, options, key: str, onchange, file: FileCallbacks) -> None:
        """`OptionInfo.onchange()` each time the setting's stored value changes through the settings gate (the
        Settings tab, POST /sdapi/v1/options), as A1111's `opts.set`: in the app process, with the live settings;
        one that raises is logged with its extension and skipped."""
        from modules.context import ScriptContext, running
        from modules.script_callbacks import call_each

        last = [options[key]]

        def listener(changed_key: str, value) -> None:
            if changed_key != key or value == last[0]:
                return
            last[0] = value
            context = ScriptContext(options=options.as_dict(), cmd_opts=self.cmd_opts, where=file.where,
                                    **self._model_fields(options.as_dict))
            with running(context):
                call_each([onchange], (), f"onchange of setting {key} of {file.where}")

        options.on_change(listener)

    def ui_tabs(self, options) -> list[tuple]:
        """`on_ui_tabs`, called while the web UI is built (inside its Blocks): [(gr.Blocks, title, elem_id)] of
        every callback, in the extensions' order. A malformed answer is logged with the extension and skipped."""
        tabs = []
        for file, answer in self._call("ui_tabs", options=options):
            for tab in answer or []:
                if isinstance(tab, (tuple, list)) and len(tab) >= 2:
                    tabs.append((tab[0], str(tab[1]), str(tab[2]) if len(tab) > 2 and tab[2] else None))
                else:
                    log.error("on_ui_tabs of %s: %r is not (gr.Blocks, title, elem_id); skipped", file.where, tab)
        return tabs

    def app_started(self, demo, app, options) -> None:
        """`on_app_started(demo, app)`, once the FastAPI app (and the Gradio blocks, None with --nowebui) exist."""
        self._call("app_started", (demo, app), options=options)

    def set_app_default_context(self, options) -> None:
        """What extension code reaches through `modules` when it runs later in the app process outside Easel's calls
        (an on_app_started route, an on_ui_tabs tab's event handler): the live settings, the flags."""
        from collections.abc import Mapping

        from modules.context import ScriptContext, set_app_default

        class LiveOptions(Mapping):
            def __getitem__(self, key):
                return options[key]

            def __iter__(self):
                return iter(options.as_dict())

            def __len__(self):
                return len(options.as_dict())

        set_app_default(ScriptContext(options=LiveOptions(), cmd_opts=self.cmd_opts, where="an extension",
                                      **self._model_fields(options.as_dict)))

    def backend_callback_files(self) -> list[tuple[str, str]]:
        """[(file, extension)] of the files whose callbacks run in every job (on_cfg_denoiser,
        on_before_image_saved, on_image_saved, on_model_loaded): the backend loads them for each job."""
        return [(str(f.path), f.extension) for f in self.callbacks if f.registry.any_backend()]

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
