"""The UI parts Easel-native extensions register (docs/extensions.md): their panels under txt2img's and img2img's
settings (ControlNet's units accordion) and their tabs (the ControlNet tab)."""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr


@dataclass
class PartsPanel:
    """The tab's extension panels: their inputs in order, and the request entries their values make."""

    panels: list = field(default_factory=list)

    @property
    def inputs(self) -> list:
        return [c for panel in self.panels for c in panel.inputs]

    def alwayson_scripts(self, values: list) -> dict:
        """The values of `inputs` -> the request's `alwayson_scripts` entries of every panel."""
        entries, start = {}, 0
        for panel in self.panels:
            entries.update(panel.alwayson_scripts(list(values[start:start + len(panel.inputs)])))
            start += len(panel.inputs)
        return entries


def build_generation_parts(service, tab: str, **context) -> PartsPanel:
    """Each extension's generation part for `tab` ("txt2img" or "img2img"); `context`: the tab's `checkpoint`,
    `width` and `height` components. A part returning None adds nothing to the request."""
    panels = []
    for build in service.native_extensions.generation_ui:
        panel = build(service, tab, **context)
        if panel is not None:
            panels.append(panel)
    return PartsPanel(panels)


def build_tabs(service) -> None:
    """The extensions' tabs, inside the page's `gr.Tabs`."""
    for tab in service.native_extensions.tabs:
        with gr.Tab(tab.title, id=tab.elem_id):
            tab.build(service)
