"""The Extras tab: upscale and restore faces in existing images (A1111's Extras).

Single Image, Batch Process (several uploads) and Batch from Directory (input and output folders);
Scale by / Scale to (with crop to fit); Upscaler 1, Upscaler 2 with its visibility; GFPGAN visibility;
CodeFormer visibility and weight. Results are saved into outputs/extras-images (or the output folder)
with the steps in the PNG's parameters.
"""
from __future__ import annotations

import html
import io
from pathlib import Path

import anyio
import gradio as gr
from PIL import Image
from pydantic import ValidationError

from backend.client import BackendError
from backend.core.errors import UserError
from backend.core.image_codec import open_image_bytes
from backend.postprocess.schemas import ExtrasRequest
from backend.service import EaselService

from ui.progress import info_html, wait_with_updates

MODES = ("single", "batch", "directory")


def build(service: EaselService) -> gr.Image:
    """Lay out the tab; returns the Single Image input (the target of the other tabs' "Send to extras")."""
    post = service.postprocess
    names = post.upscaler_names()
    mode = gr.State("single")
    resize_mode = gr.State(0)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id="extras_mode_tabs"):
                with gr.Tab("Single Image", id="single_image", elem_id="extras_single_tab") as tab_single:
                    image = gr.Image(label="Source", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                     height=320, elem_id="extras_image")
                with gr.Tab("Batch Process", id="batch_process", elem_id="extras_batch_tab") as tab_batch:
                    files = gr.File(label="Batch Process", file_count="multiple", type="filepath",
                                    elem_id="extras_image_batch")
                with gr.Tab("Batch from Directory", id="batch_from_directory", elem_id="extras_dir_tab") as tab_dir:
                    input_dir = gr.Textbox(label="Input directory", placeholder="A folder on the server with images",
                                           elem_id="extras_batch_input_dir")
                    output_dir = gr.Textbox(label="Output directory",
                                            placeholder="Leave blank to save images to outputs/extras-images",
                                            elem_id="extras_batch_output_dir")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="extras_generate")
                interrupt = gr.Button("Interrupt", elem_id="extras_interrupt", size="sm")
            with gr.Tabs(elem_id="extras_resize_mode"):
                with gr.Tab("Scale by", id="scale_by", elem_id="extras_scale_by_tab") as tab_scale_by:
                    upscaling_resize = gr.Slider(1.0, 8.0, value=4, step=0.05, label="Resize",
                                                 elem_id="extras_upscaling_resize")
                with gr.Tab("Scale to", id="scale_to", elem_id="extras_scale_to_tab") as tab_scale_to:
                    with gr.Row():
                        resize_w = gr.Slider(64, 8192, value=512, step=8, label="Width", elem_id="extras_upscaling_resize_w")
                        resize_h = gr.Slider(64, 8192, value=512, step=8, label="Height", elem_id="extras_upscaling_resize_h")
                    crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
            with gr.Row():
                upscaler_1 = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id="extras_upscaler_1", scale=4)
                refresh = gr.Button("\U0001f504", elem_id="extras_refresh_upscalers", size="sm", min_width=40, scale=0)
            with gr.Row():
                upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2", scale=4)
                upscaler_2_visibility = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                                  elem_id="extras_upscaler_2_visibility", scale=3)
            gfpgan_visibility = gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility",
                                          elem_id="extras_gfpgan_visibility")
            with gr.Row():
                codeformer_visibility = gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                                                  elem_id="extras_codeformer_visibility")
                codeformer_weight = gr.Slider(0, 1, value=0, step=0.001,
                                              label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                              elem_id="extras_codeformer_weight")
            upscale_first = gr.Checkbox(True, label="Upscale before restoring faces", elem_id="extras_upscale_first")
        with gr.Column(scale=1):
            progress = gr.HTML(elem_id="extras_progress")
            gallery = gr.Gallery(label="Result", columns=3, height=512, elem_id="extras_gallery", format="png")
            info = gr.HTML(elem_id="extras_info")

    for tab, value in ((tab_single, "single"), (tab_batch, "batch"), (tab_dir, "directory")):
        tab.select(lambda v=value: v, outputs=[mode], queue=False)
    tab_scale_by.select(lambda: 0, outputs=[resize_mode], queue=False)
    tab_scale_to.select(lambda: 1, outputs=[resize_mode], queue=False)

    def on_refresh():
        choices = post.upscaler_names()
        return gr.update(choices=choices), gr.update(choices=choices)

    refresh.click(on_refresh, outputs=[upscaler_1, upscaler_2], queue=False)
    interrupt.click(lambda: service.interrupt(), queue=False)

    def start(mode_value, img, paths, in_dir, out_dir, req: ExtrasRequest):
        if mode_value == "directory":
            return post.submit_extras_folder(req, in_dir or "", out_dir or "")
        if mode_value == "batch":
            if not paths:
                raise UserError("Batch Process: upload one or more images first.")
            images = []
            for p in paths:
                path = Path(p)
                try:
                    images.append((path.name, open_image_bytes(path.read_bytes())))
                except UserError as exc:
                    raise UserError(f"{path.name}: {exc.message}", status=exc.status) from exc
            return post.submit_extras(req, images, save=True)
        if img is None:
            raise UserError("Single Image: upload an image first.")
        return post.submit_extras(req, [("image", img)], save=True)

    async def on_generate(mode_value, img, paths, in_dir, out_dir, rmode, by, w, h, crop_value, up1, up2, up2_vis, gfp_vis,
                    cf_vis, cf_weight, first):
        keep = gr.update()
        try:
            req = ExtrasRequest(resize_mode=int(rmode), upscaling_resize=float(by), upscaling_resize_w=int(w),
                                upscaling_resize_h=int(h), upscaling_crop=bool(crop_value), upscaler_1=up1 or "None",
                                upscaler_2=up2 or "None", extras_upscaler_2_visibility=float(up2_vis),
                                gfpgan_visibility=float(gfp_vis), codeformer_visibility=float(cf_vis),
                                codeformer_weight=float(cf_weight), upscale_first=bool(first))
            job = await anyio.to_thread.run_sync(start, mode_value, img, paths, in_dir, out_dir, req)
        except ValidationError as exc:
            yield keep, "", info_html(f"Invalid settings: {exc.errors()[0].get('msg')}", error=True)
            return
        except (UserError, BackendError) as exc:
            yield keep, "", info_html(exc.message, error=True)
            return
        async for progress_html, _preview in wait_with_updates(job, service.client):
            yield keep, progress_html, keep
        if job.error is not None:
            yield keep, "", info_html(getattr(job.error, "message", str(job.error)), error=True)
            return
        result = job.result
        pictures = [(Image.open(io.BytesIO(img.png)), img.name) for img in result.images if img.png]
        saved = [img.saved_path for img in result.images if img.saved_path]
        text = result.html_info
        if saved:
            where = saved[0] if len(saved) == 1 else f"{len(saved)} images in {Path(saved[0]).parent}"
            text += f"<p>Saved: {html.escape(where)}</p>"
        yield pictures, "", f'<div class="easel-infotext">{text}</div>'

    generate.click(on_generate,
                   inputs=[mode, image, files, input_dir, output_dir, resize_mode, upscaling_resize, resize_w, resize_h,
                           crop, upscaler_1, upscaler_2, upscaler_2_visibility, gfpgan_visibility, codeformer_visibility,
                           codeformer_weight, upscale_first],
                   outputs=[gallery, progress, info], concurrency_limit=None)
    return image
