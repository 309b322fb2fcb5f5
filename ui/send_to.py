"""The "Send to img2img / inpaint / extras" buttons under the result galleries."""
from __future__ import annotations

import gradio as gr

from .generation import selected_image


def wire(tabs: gr.Tabs, results: list[dict], img2img_images: dict, extras_image: gr.Image | None = None) -> None:
    """Connect every results column's Send to buttons to the img2img sub-tabs (and Extras, when present)."""
    sub_tabs, mode = img2img_images["sub_tabs"], img2img_images["mode"]
    for r in results:
        state = [r["images"], r["selected"]]

        def to_img2img(images, selected):
            img = selected_image(images, selected)
            if img is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            return img, gr.Tabs(selected="img2img"), gr.Tabs(selected="img2img"), "img2img"

        def to_inpaint(images, selected):
            img = selected_image(images, selected)
            if img is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            editor = {"background": img, "layers": [], "composite": img}
            return editor, gr.Tabs(selected="img2img"), gr.Tabs(selected="inpaint"), "inpaint"

        r["send_img2img"].click(to_img2img, inputs=state, outputs=[img2img_images["init_image"], tabs, sub_tabs, mode])
        r["send_inpaint"].click(to_inpaint, inputs=state, outputs=[img2img_images["inpaint"], tabs, sub_tabs, mode])
        if extras_image is not None:
            def to_extras(images, selected):
                img = selected_image(images, selected)
                return (img, gr.Tabs(selected="extras")) if img is not None else (gr.update(), gr.update())

            r["send_extras"].click(to_extras, inputs=state, outputs=[extras_image, tabs])
