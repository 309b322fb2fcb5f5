"""`ui-config.json`: the default value, minimum, maximum and step of the UI's controls, as AUTOMATIC1111 keeps them.

Keys are A1111's: `<tab>/<label>/<field>`, e.g. `txt2img/Sampling steps/value`, `txt2img/Width/maximum`
(`<tab>`: the tab's id: txt2img, img2img, extras, pnginfo, ...). When the page is built, every labelled control of
the tabs gets the value the file holds for it, and the file is written back with every control's current default
(so a missing file is created with all of them, and a new control's key is added). A file that cannot be read as
a JSON object is left as it is, logged with its name, and the built-in defaults are used.

These are UI hints only: a slider's maximum here never lifts a limit of the server (`backend/core/limits.py`, the
request checks), which every job passes whatever the page sent.
"""
from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import gradio as gr

log = logging.getLogger(__name__)

# Tabs whose controls show stored settings or lists (their values come from config.json, not from here).
SKIPPED_TABS = ("settings", "extensions")
_CONTROLS = (gr.Slider, gr.Number, gr.Checkbox, gr.Dropdown, gr.Radio, gr.Textbox, gr.CheckboxGroup)


def read(path: Path) -> tuple[dict[str, Any], bool]:
    """-> (the stored values, whether the file may be written back). A missing file is {} and writable; a
    malformed one is logged and left alone."""
    if not path.exists():
        return {}, True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.error("The UI config file %s could not be read (%s); the built-in defaults are used and the file is left "
                  "as it is: fix or delete it.", path, exc)
        return {}, False
    if not isinstance(data, dict):
        log.error("The UI config file %s does not hold a JSON object; the built-in defaults are used and the file is "
                  "left as it is: fix or delete it.", path)
        return {}, False
    return data, True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _acceptable(component: gr.components.Component, field: str, value: Any) -> bool:
    """Whether `value` can be `component`'s `field` (a wrong type or a choice the control lacks is not)."""
    if field in ("minimum", "maximum", "step"):
        return _number(value) and (field != "step" or value > 0)
    if isinstance(component, (gr.Slider, gr.Number)):
        return _number(value)
    if isinstance(component, gr.Checkbox):
        return isinstance(value, bool)
    choices = [c[1] if isinstance(c, (tuple, list)) else c for c in (getattr(component, "choices", None) or [])]
    if isinstance(component, gr.CheckboxGroup) or (isinstance(component, gr.Dropdown) and component.multiselect):
        return isinstance(value, list) and all(v in choices for v in value)
    if isinstance(component, (gr.Dropdown, gr.Radio)):
        return value in choices or (isinstance(component, gr.Dropdown) and component.allow_custom_value
                                    and isinstance(value, str))
    return isinstance(value, str)


def _fields(component: gr.components.Component) -> tuple[str, ...]:
    return ("value", "minimum", "maximum", "step") if isinstance(component, gr.Slider) else ("value",)


def _walk(block, path: str, seen: dict[str, int], found: list) -> None:
    for child in getattr(block, "children", None) or []:
        if isinstance(child, gr.Tab):
            tab = str(child.id if child.id is not None else child.label)
            if tab in SKIPPED_TABS:
                continue
            _walk(child, tab if not path else f"{path}/{tab}", seen, found)
        elif isinstance(child, _CONTROLS) and path and child.label and not callable(child.value):
            key = f"{path}/{child.label}"
            seen[key] = seen.get(key, 0) + 1
            found.append((key if seen[key] == 1 else f"{key} ({seen[key]})", child))  # the same label twice in a tab
        else:
            _walk(child, path, seen, found)


def controls(root) -> list[tuple[str, gr.components.Component]]:
    """The labelled controls inside the tabs of `root`, each with its key prefix (`txt2img/Sampling steps`)."""
    found: list = []
    _walk(root, "", {}, found)
    return found


def apply(root, path: Path) -> dict[str, Any]:
    """Give the controls of `root` (inside its `with gr.Blocks()`, before the page config is made) the values
    `path` holds, then write back every control's default where the file is missing or was read. Returns the
    values now in effect, by key."""
    stored, writable = read(path)
    result = dict(stored)
    for prefix, component in controls(root):
        for field in _fields(component):
            key = f"{prefix}/{field}"
            if key in stored and stored[key] is not None:
                if _acceptable(component, field, stored[key]):
                    setattr(component, field, stored[key])
                else:
                    log.warning("The UI config file %s: %r = %r does not fit that control; its default %r is used.",
                                path, key, stored[key], getattr(component, field))  # the file keeps what it holds
            else:
                result[key] = getattr(component, field)
    if writable and result != stored:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=4, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            log.error("The UI config file %s could not be written (%s).", path, exc)
    return result


def _as_stored(component: gr.components.Component, value: Any) -> Any:
    """A control's value as the page sends it, written as ui-config.json holds it (a choice by its name, not by
    the index a `type="index"` control hands the event; a whole number as an int)."""
    if getattr(component, "type", None) == "index" and isinstance(value, int) and not isinstance(value, bool):
        choices = [c[1] if isinstance(c, (tuple, list)) else c for c in (component.choices or [])]
        value = choices[value] if 0 <= value < len(choices) else value
    if isinstance(value, float) and value.is_integer() and isinstance(getattr(component, "step", None), int):
        value = int(value)
    return value


def _empty(value: Any) -> bool:
    """No value: what the file holds for an empty text box (null) and what the page sends for it ("") match."""
    return value is None or value == "" or value == []


def _differences(path: Path, found: list, values: tuple) -> tuple[dict[str, Any], list[tuple[str, Any, Any]], bool]:
    stored, writable = read(path)
    changes = []
    for (prefix, component), value in zip(found, values):
        key = f"{prefix}/value"
        value = _as_stored(component, value)
        if key in stored and stored[key] != value and not (_empty(stored[key]) and _empty(value)):
            changes.append((key, stored[key], value))
    return stored, changes, writable


def _table(changes: list[tuple[str, Any, Any]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(json.dumps(old, ensure_ascii=False))}</td>"
                   f"<td>{html.escape(json.dumps(new, ensure_ascii=False))}</td></tr>" for key, old, new in changes)
    return f"<table><thead><tr><th>Path</th><th>Old value</th><th>New value</th></tr></thead><tbody>{rows}</tbody></table>"


def wire_defaults(root, path: Path, view: gr.Button, apply_button: gr.Button, result: gr.HTML) -> None:
    """The Settings tab's Defaults (as A1111's): View changes lists the controls whose value on the page differs
    from ui-config.json; Apply writes those values there, the controls' defaults from the next server start."""
    found = controls(root)
    inputs = [component for _prefix, component in found]

    def on_view(*values):
        _stored, changes, _writable = _differences(path, found, values)
        return _table(changes) if changes else "No changes: every control shows its default."

    def on_apply(*values):
        stored, changes, writable = _differences(path, found, values)
        if not writable:
            return (f'<div class="easel-error">The UI config file {html.escape(str(path))} could not be read; fix or '
                    "delete it, then restart.</div>")
        if not changes:
            return "No changes: every control shows its default."
        stored.update({key: new for key, _old, new in changes})
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(stored, indent=4, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            return f'<div class="easel-error">{html.escape(f"{path} could not be written ({exc}).")}</div>'
        return (html.escape(f"Wrote {len(changes)} default(s) to {path}; they apply after a restart.") + _table(changes))

    view.click(on_view, inputs=inputs, outputs=result)
    apply_button.click(on_apply, inputs=inputs, outputs=result)
