"""The PNG Info tab: read the generation parameters from an image, send them to txt2img."""
from __future__ import annotations

import gradio as gr

from backend import infotext
from backend.service import EaselService

from .progress import info_html


def build(service: EaselService, txt2img_fields: dict, tabs: gr.Tabs):
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", sources=["upload", "clipboard"], elem_id="pnginfo_image",
                             image_mode=None)
        with gr.Column():
            html_info = gr.HTML(elem_id="pnginfo_html")
            raw = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")

    def on_image(img):
        if img is None:
            return "", ""
        text, _params, extra = service.png_info(img)
        if not text and not extra:
            return info_html("This image has no generation parameters."), ""
        shown = text + "".join(f"\n\n{k}: {v}" for k, v in extra.items())
        return info_html(shown), text

    image.change(on_image, inputs=[image], outputs=[html_info, raw])

    names = list(txt2img_fields)

    def on_send(text: str):
        if not text:
            return [gr.update() for _ in names] + [gr.update()]
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
        return updates + [gr.Tabs(selected="txt2img")]

    send.click(on_send, inputs=[raw], outputs=[txt2img_fields[n] for n in names] + [tabs])


def _schedule_label(value: str) -> str | None:
    from backend import samplers
    for s in samplers.SCHEDULERS:
        if str(value).lower() in (s.name.lower(), s.label.lower()):
            return s.label
    return None
