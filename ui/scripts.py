"""The "Script" dropdown at the bottom of txt2img and img2img, as in A1111: None, then the scripts the tab
shows; each script's controls in a group shown only while it is selected. The controls are built from the
scripts' argument specs (`backend.core.scripts_catalog`), in the order of A1111's `script_args`, so the request
the tab sends is the one an API client sends.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import gradio as gr

from backend.core.scripts_catalog import ScriptArg, ScriptSpec
from backend.core.xyz_axes import SCRIPT_TITLE as XYZ_TITLE
from backend.service import EaselService
from ui import xyz_plot

NONE = "None"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _control(service: EaselService, spec: ScriptArg, elem_id: str):
    """The Gradio component for one argument (None for A1111's informational text, which is not an input)."""
    kind = spec.kind
    if kind == "info":
        gr.Markdown(spec.label)
        return None
    if kind == "checkbox":
        return gr.Checkbox(bool(spec.default), label=spec.label, elem_id=elem_id)
    if kind == "slider":
        return gr.Slider(spec.minimum, spec.maximum, value=spec.default, step=spec.step, label=spec.label,
                         elem_id=elem_id)
    if kind == "number":
        return gr.Number(spec.default, label=spec.label, minimum=spec.minimum, maximum=spec.maximum, elem_id=elem_id)
    if kind == "radio":
        value = spec.choices[spec.default] if spec.index else spec.default
        return gr.Radio(list(spec.choices), value=value, type="index" if spec.index else "value", label=spec.label,
                        elem_id=elem_id)
    if kind == "dropdown":
        # index: A1111 passes the choice's index (a default given as an index is shown as its choice)
        value = spec.choices[spec.default] if spec.index and isinstance(spec.default, int) else spec.default
        return gr.Dropdown(list(spec.choices), value=value, type="index" if spec.index else "value", label=spec.label,
                           elem_id=elem_id)
    if kind == "checkboxgroup":
        return gr.CheckboxGroup(list(spec.choices), value=list(spec.default or []), label=spec.label,
                                elem_id=elem_id)
    if kind == "list":  # shown once it has choices (X/Y/Z: when the axis type has some, see ui/xyz_plot.py)
        return gr.Dropdown(list(spec.choices or []), value=list(spec.default or []), multiselect=True,
                           allow_custom_value=True, label=spec.label, elem_id=elem_id, visible=bool(spec.choices))
    if kind == "textbox":
        box = gr.Textbox(spec.default or "", lines=spec.lines, label=spec.label, elem_id=elem_id)
        if spec.upload:
            upload = gr.File(label="Upload prompt inputs", file_types=[".txt"], type="binary",
                             elem_id=f"{elem_id}_file")
            upload.upload(_text_of_file, inputs=[upload], outputs=[box], queue=False)
        return box
    if kind == "upscaler":
        names = service.postprocess.upscaler_names()
        return gr.Dropdown(names, value=spec.default if spec.default in names else (names[0] if names else None),
                           label=spec.label, elem_id=elem_id)
    raise AssertionError(f"no control for script argument kind {kind!r}")


def _text_of_file(data: bytes | None):
    """An uploaded text file's contents for its textbox (UTF-8, as A1111 reads it)."""
    if not data:
        return gr.update()
    return data.decode("utf-8", errors="replace")


@dataclass
class ScriptPanel:
    """The tab's script dropdown and controls. `inputs` go into the tab's Generate inputs (in this order);
    `request_fields(values)` turns their values into `script_name` + `script_args`."""

    dropdown: gr.Dropdown
    scripts: list[ScriptSpec]
    controls: dict[str, list] = field(default_factory=dict)  # script name -> its components (None: info text)
    # AlwaysVisible extension scripts (A1111's always-on accordions): title -> their components, after the others
    always_on: dict[str, list] = field(default_factory=dict)

    @property
    def inputs(self) -> list:
        return [self.dropdown] + [c for name in self.controls for c in self.controls[name] if c is not None] + \
            [c for title in self.always_on for c in self.always_on[title] if c is not None]

    def alwayson_scripts(self, values: list) -> dict:
        """{title: {"args": [...]}} for the always-on extension scripts, as A1111's UI sends every one of them."""
        own = sum(1 for controls in self.controls.values() for c in controls if c is not None)
        rest = iter(values[1 + own:])
        return {title: {"args": [None if c is None else next(rest) for c in controls]}
                for title, controls in self.always_on.items()}

    def request_fields(self, values: list) -> dict:
        """{} for None, else {"script_name": title, "script_args": [...]} in A1111's order."""
        chosen, rest = values[0], list(values[1:])
        taken: dict[str, list] = {}
        for name, controls in self.controls.items():
            count = sum(1 for c in controls if c is not None)
            taken[name], rest = rest[:count], rest[count:]
        spec = next((s for s in self.scripts if s.title == chosen), None)
        if spec is None:
            return {}
        own = iter(taken[spec.name])
        args = [None if control is None else next(own) for control in self.controls[spec.name]]
        return {"script_name": spec.title, "script_args": args}

    def selected(self, values: list) -> ScriptSpec | None:
        return next((s for s in self.scripts if s.title == values[0]), None)


def build(service: EaselService, tab: str) -> ScriptPanel:
    always_on = {}
    for spec in service.extension_scripts.always_on_specs(tab):  # A1111: each in its own accordion, above
        with gr.Accordion(spec.title, open=False, elem_id=f"{tab}_script_{_slug(spec.title)}"):
            always_on[spec.title] = [_control(service, arg, f"{tab}_script_{_slug(spec.title)}_{arg.key}")
                                     for arg in spec.args]
    scripts = service.selectable_scripts.for_tab(tab)
    dropdown = gr.Dropdown([NONE] + [s.title for s in scripts], value=NONE, label="Script",
                           elem_id=f"{tab}_script_list")
    panel = ScriptPanel(dropdown, scripts, always_on=always_on)
    groups = []
    for spec in scripts:
        with gr.Group(visible=False, elem_id=f"{tab}_script_{_slug(spec.title)}") as group:
            if spec.description:
                gr.Markdown(spec.description)
            panel.controls[spec.name] = [_control(service, arg, f"{tab}_script_{_slug(spec.title)}_{arg.key}")
                                         for arg in spec.args]
            if spec.title == XYZ_TITLE:  # its values dropdowns, fill and swap buttons
                xyz_plot.wire(service, tab, panel.controls[spec.name], f"{tab}_script_{_slug(spec.title)}")
        groups.append(group)

    def show(chosen: str):
        return [gr.update(visible=spec.title == chosen) for spec in scripts]

    dropdown.change(show, inputs=[dropdown], outputs=groups, queue=False)
    return panel
