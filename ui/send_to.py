"""The "Send to img2img / inpaint / extras" buttons under the result galleries.

As A1111, sending a picture to img2img or inpaint carries its parameters too (prompts, styles, seed, sampler,
schedule, steps, CFG, clip skip, ...: `ui.paste_params`, the one paste), with the picture's own size as the
img2img size, so a user can refine or inpaint it straight away.
"""
from __future__ import annotations

import gradio as gr

from ui import paste_params
from ui.generation import selected_image


def wire(service, tabs: gr.Tabs, results: list[dict], img2img_fields: dict, img2img_images: dict,
         extras_image: gr.Image | None = None, checkpoint: gr.components.Component | None = None) -> None:
    """Connect every results column's Send to buttons to the img2img sub-tabs (and Extras, when present)."""
    sub_tabs, mode = img2img_images["sub_tabs"], img2img_images["mode"]
    targets, carried = paste_params.paste_targets(img2img_fields)
    current = [checkpoint] if checkpoint is not None else []
    for r in results:
        state = [r["images"], r["selected"], r["infotexts"]]

        def sender(sub_tab: str, picture):
            def send(images, selected, texts, *ckpt):
                img = selected_image(images, selected)
                if img is None:
                    return {}
                text = texts[selected] if texts and 0 <= selected < len(texts) else paste_params.last_infotext(texts)
                updates = paste_params.field_updates(service, text, targets, "img2img", keep_size=True,
                                                     override=img2img_fields["override_choices"],
                                                     current_checkpoint=ckpt[0] if ckpt else None)
                updates[targets["width"]] = gr.update(value=img.width // 8 * 8)
                updates[targets["height"]] = gr.update(value=img.height // 8 * 8)
                updates.update({picture: img, tabs: gr.Tabs(selected="img2img"), sub_tabs: gr.Tabs(selected=sub_tab),
                                mode: sub_tab})
                return updates
            return send

        for button, sub_tab, picture in ((r["send_img2img"], "img2img", img2img_images["init_image"]),
                                         (r["send_inpaint"], "inpaint", img2img_images["inpaint"])):
            button.click(sender(sub_tab, picture), inputs=state + current,
                         outputs=[picture, tabs, sub_tabs, mode] + carried)
        if extras_image is not None:
            def to_extras(images, selected, _texts):
                img = selected_image(images, selected)
                return (img, gr.Tabs(selected="extras")) if img is not None else (gr.update(), gr.update())

            r["send_extras"].click(to_extras, inputs=state, outputs=[extras_image, tabs])
