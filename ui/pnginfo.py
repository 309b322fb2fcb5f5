"""The PNG Info tab: read the generation parameters from an image, send them (and the picture) to txt2img, img2img,
inpaint or Extras. The parameters go into the tabs through `ui.paste_params` (as every paste does); the checkpoint
that made the picture is named, and offered to the tab as an override setting when it is here."""
from __future__ import annotations

import gradio as gr

from backend.service import EaselService

from ui import paste_params
from ui.progress import info_html


def build(service: EaselService, txt2img_fields: dict, tabs: gr.Tabs, img2img_fields: dict | None = None,
          img2img_images: dict | None = None, extras_image: gr.Image | None = None,
          checkpoint: gr.components.Component | None = None):
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", sources=["upload", "clipboard"], elem_id="pnginfo_image",
                             image_mode=None)
        with gr.Column():
            html_info = gr.HTML(elem_id="pnginfo_html")
            raw = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            with gr.Row():
                send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img",
                                         visible=img2img_fields is not None)
                send_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_inpaint",
                                         visible=img2img_images is not None)
                send_extras = gr.Button("Send to extras", elem_id="pnginfo_send_extras", visible=extras_image is not None)

    def on_image(img):
        if img is None:
            return "", ""
        text, params, extra = service.png_info(img)
        if not text and not extra:
            return info_html("This image has no generation parameters."), ""
        note = paste_params.checkpoint_note(service, params)
        shown = text + (f"\n\n{note}" if note else "") + "".join(f"\n\n{k}: {v}" for k, v in extra.items())
        return info_html(shown), text

    image.change(on_image, inputs=[image], outputs=[html_info, raw])
    current = [checkpoint] if checkpoint is not None else []

    t2i_targets, t2i_outputs = paste_params.paste_targets(txt2img_fields)

    def on_send_txt2img(text, *ckpt):
        updates = paste_params.field_updates(service, text, t2i_targets, "txt2img",
                                             override=txt2img_fields.get("override_choices"),
                                             current_checkpoint=ckpt[0] if ckpt else None)
        return {**updates, tabs: gr.Tabs(selected="txt2img")}

    send.click(on_send_txt2img, inputs=[raw] + current, outputs=t2i_outputs + [tabs])
    if img2img_fields is None:
        return
    i2i_targets, i2i_outputs = paste_params.paste_targets(img2img_fields)

    def sender(sub_tab: str, picture_key: str):
        def send_picture(text, img, *ckpt):
            updates = paste_params.field_updates(service, text, i2i_targets, "img2img",
                                                 override=img2img_fields.get("override_choices"),
                                                 current_checkpoint=ckpt[0] if ckpt else None)
            updates[tabs] = gr.Tabs(selected="img2img")
            if img2img_images is not None:
                updates[img2img_images[picture_key]] = img
                updates[img2img_images["sub_tabs"]] = gr.Tabs(selected=sub_tab)
                updates[img2img_images["mode"]] = sub_tab
            return updates
        return send_picture

    picture_outputs = ([img2img_images["init_image"], img2img_images["inpaint"], img2img_images["sub_tabs"],
                        img2img_images["mode"]] if img2img_images is not None else [])
    send_img2img.click(sender("img2img", "init_image"), inputs=[raw, image] + current,
                       outputs=i2i_outputs + [tabs] + picture_outputs)
    if img2img_images is not None:
        send_inpaint.click(sender("inpaint", "inpaint"), inputs=[raw, image] + current,
                           outputs=i2i_outputs + [tabs] + picture_outputs)
    if extras_image is not None:
        send_extras.click(lambda img: (img, gr.Tabs(selected="extras")) if img is not None else (gr.update(), gr.update()),
                          inputs=[image], outputs=[extras_image, tabs])
