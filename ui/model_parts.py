"""The "VAE / Text Encoder" multi-select beside the checkpoint (Forge's): the files that complete a FLUX.1 or SD3
checkpoint (a VAE such as ae.safetensors, CLIP-L, CLIP-G, T5-XXL) from models/VAE, models/text_encoder and
models/clip.

It shows the files by name, as Forge does; a change is stored through the one settings gate as the setting
`forge_additional_modules` (full paths, Forge's form) and takes effect at the next generation (the checkpoint is
loaded with the parts then). The checkpoint's refresh button lists the files again. SD checkpoints keep the SD VAE
dropdown; they do not use these parts.
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from backend.core.errors import UserError
from backend.service import EaselService

LABEL = "VAE / Text Encoder"


def shown_value(service: EaselService) -> list[str]:
    """The chosen files as the multi-select shows them: their names, those still listed."""
    names = set(service.parts.names())
    return [Path(p).name for p in service.options["forge_additional_modules"] if Path(p).name in names]


def build(service: EaselService, visible: bool = True) -> gr.Dropdown:
    return gr.Dropdown(service.parts.names(), value=shown_value(service), multiselect=True, label=LABEL,
                       elem_id="setting_forge_additional_modules", scale=3, min_width=200, visible=visible,
                       info=None)


def choices_update(service: EaselService) -> dict:
    """The multi-select's files and selection as the server has them now (page load, refresh)."""
    return gr.update(choices=service.parts.names(), value=shown_value(service))


def wire(service: EaselService, modules: gr.Dropdown, notice: gr.HTML) -> None:
    """A change of the selection is stored through the settings gate; a refused one shows why in the notice and the
    selection goes back to what is stored."""

    def on_change(names: list[str] | None):
        try:
            service.set_options({"forge_additional_modules": list(names or [])})
            message = gr.update()
        except UserError as exc:
            message = f'<div class="easel-error">{html.escape(exc.message)}</div>'
        return gr.update(value=shown_value(service)), message

    modules.input(on_change, inputs=[modules], outputs=[modules, notice], queue=False)
