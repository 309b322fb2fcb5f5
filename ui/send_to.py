"""The "Send to img2img / inpaint / extras" buttons under the result galleries.

Like A1111, sending a picture to img2img also carries its prompt, negative
prompt and size, so a user can refine or inpaint it straight away.
"""
from __future__ import annotations

import gradio as gr

from backend.core import infotext

from ui.generation import selected_image


def _carried(texts: list, selected: int, img) -> list:
    """Prompt, negative prompt, width, height for the img2img fields."""
    text = texts[selected] if texts and 0 <= selected < len(texts) else ""
    params = infotext.parse_infotext(text) if text else {}
    width, height = (img.width // 8 * 8, img.height // 8 * 8) if img is not None else (None, None)
    values = [params.get("Prompt"), params.get("Negative prompt"), width, height]
    return [gr.update(value=v) if v is not None else gr.update() for v in values]


def wire(tabs: gr.Tabs, results: list[dict], img2img_fields: dict, img2img_images: dict,
         extras_image: gr.Image | None = None) -> None:
    """Connect every results column's Send to buttons to the img2img sub-tabs (and Extras, when present)."""
    sub_tabs, mode = img2img_images["sub_tabs"], img2img_images["mode"]
    carried = [img2img_fields[k] for k in ("prompt", "negative_prompt", "width", "height")]
    for r in results:
        state = [r["images"], r["selected"], r["infotexts"]]

        def sender(sub_tab: str):
            def send(images, selected, texts):
                img = selected_image(images, selected)
                if img is None:
                    return [gr.update()] * (4 + len(carried))
                return [img, gr.Tabs(selected="img2img"), gr.Tabs(selected=sub_tab), sub_tab] + _carried(texts, selected, img)
            return send

        r["send_img2img"].click(sender("img2img"), inputs=state,
                                outputs=[img2img_images["init_image"], tabs, sub_tabs, mode] + carried)
        r["send_inpaint"].click(sender("inpaint"), inputs=state,
                                outputs=[img2img_images["inpaint"], tabs, sub_tabs, mode] + carried)
        if extras_image is not None:
            def to_extras(images, selected, _texts):
                img = selected_image(images, selected)
                return (img, gr.Tabs(selected="extras")) if img is not None else (gr.update(), gr.update())

            r["send_extras"].click(to_extras, inputs=state, outputs=[extras_image, tabs])
