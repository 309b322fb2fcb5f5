"""Soft inpainting (A1111's built-in extension of the same name), a built-in Easel extension:
`alwayson_scripts: {"soft inpainting": {"args": [True]}}` in img2img blends the inpainted area into the picture by
the blurred mask (differential diffusion). The UI's checkbox is in its own accordion under img2img's settings; the
engine's hook is `backend.engine.soft_inpainting`."""
from __future__ import annotations

NAME = "soft inpainting"


class SoftInpaintingScript:
    """The app side: the entry's first argument switches it on (A1111's "Soft inpainting" checkbox)."""

    name = NAME

    def for_job(self, entry, *, img2img: bool):
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        return True if img2img and args and args[0] else None


class SoftInpaintingPanel:
    def __init__(self, checkbox):
        self.inputs = [checkbox]

    def alwayson_scripts(self, values: list) -> dict:
        return {NAME: {"args": [True]}} if values and values[0] else {}


def _panel(service, tab, **context):
    if tab != "img2img":  # an img2img script, as in A1111
        return None
    import gradio as gr

    with gr.Accordion("Soft inpainting", open=False, elem_id="img2img_soft_inpainting_accordion"):
        checkbox = gr.Checkbox(False, label="Soft inpainting (blend the mask edge smoothly)",
                               elem_id="img2img_soft_inpainting")
    return SoftInpaintingPanel(checkbox)


def register(registry) -> None:
    registry.add_always_on_script(NAME, app=lambda service: SoftInpaintingScript(),
                                  engine="backend.engine.soft_inpainting", txt2img=False)
    registry.add_generation_ui(_panel)
