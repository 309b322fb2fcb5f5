"""The PNG Info tab: read the generation parameters from an image, send them to txt2img."""
from __future__ import annotations

import gradio as gr

from backend.core import infotext
from backend.service import EaselService

from ui.progress import info_html


def build(service: EaselService, txt2img_fields: dict, tabs: gr.Tabs, img2img_fields: dict | None = None,
          img2img_image: gr.Image | None = None):
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", sources=["upload", "clipboard"], elem_id="pnginfo_image",
                             image_mode=None)
        with gr.Column():
            html_info = gr.HTML(elem_id="pnginfo_html")
            raw = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            with gr.Row():
                send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img", visible=img2img_fields is not None)

    def on_image(img):
        if img is None:
            return "", ""
        text, _params, extra = service.png_info(img)
        if not text and not extra:
            return info_html("This image has no generation parameters."), ""
        shown = text + "".join(f"\n\n{k}: {v}" for k, v in extra.items())
        return info_html(shown), text

    image.change(on_image, inputs=[image], outputs=[html_info, raw])

    def field_updates(text: str, names: list[str]) -> list:
        if not text:
            return [gr.update() for _ in names]
        fields = infotext.infotext_to_request_fields(infotext.parse_infotext(text))
        updates = []
        for name in names:
            if name == "clip_skip" and "clip_skip" in fields:
                updates.append(gr.update(value=int(fields["clip_skip"])))
            elif name == "scheduler" and "scheduler" in fields:
                label = _schedule_label(fields["scheduler"])
                updates.append(gr.update(value=label) if label else gr.update())
            elif name in fields:
                updates.append(gr.update(value=fields[name]))
            else:
                updates.append(gr.update())
        return updates

    t2i_names = list(txt2img_fields)
    send.click(lambda text: field_updates(text, t2i_names) + [gr.Tabs(selected="txt2img")], inputs=[raw],
               outputs=[txt2img_fields[n] for n in t2i_names] + [tabs])
    if img2img_fields is not None:
        i2i_names = [n for n in img2img_fields if n not in ("resize_mode", "inpainting_mask_invert", "inpainting_fill",
                                                             "inpaint_full_res")]
        outputs = [img2img_fields[n] for n in i2i_names] + [tabs] + ([img2img_image] if img2img_image is not None else [])

        def on_send_img2img(text, img):
            extra = [img] if img2img_image is not None else []
            return field_updates(text, i2i_names) + [gr.Tabs(selected="img2img")] + extra

        send_img2img.click(on_send_img2img, inputs=[raw, image], outputs=outputs)


def _schedule_label(value: str) -> str | None:
    from backend.core import sampler_catalog
    for s in sampler_catalog.SCHEDULERS:
        if str(value).lower() in (s.name.lower(), s.label.lower()):
            return s.label
    return None
