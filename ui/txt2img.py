"""The txt2img tab: A1111's controls, a live progress bar and preview, Interrupt and Skip."""
from __future__ import annotations

import io

import gradio as gr
from PIL import Image

from backend import samplers
from backend.client import BackendError
from backend.errors import UserError
from backend.pipelines.txt2img import HIRES_UPSCALERS
from backend.schemas import Txt2ImgRequest
from backend.service import EaselService

from .progress import info_html, wait_with_updates

# Request fields the tab edits, in the order of the `inputs` list.
FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "width", "height", "batch_size", "n_iter",
          "cfg_scale", "seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "tiling",
          "clip_skip", "enable_hr", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_scale",
          "hr_resize_x", "hr_resize_y"]


def build(service: EaselService, checkpoint: gr.Dropdown, vae: gr.Dropdown) -> dict[str, gr.components.Component]:
    """Lay out the tab; returns the field components by request-field name (used by PNG Info's Send to txt2img)."""
    c: dict[str, gr.components.Component] = {}
    sampler_names = [s.name for s in samplers.SAMPLERS]
    schedule_labels = [s.label for s in samplers.SCHEDULERS]
    with gr.Row(elem_id="txt2img_toprow"):
        with gr.Column(scale=6):
            c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt",
                                     placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:when], [a|b], BREAK)")
            c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id="txt2img_skip", size="sm")
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                c["sampler_name"] = gr.Dropdown(sampler_names, value=service.options["default_sampler"], label="Sampling method", elem_id="txt2img_sampling")
                c["scheduler"] = gr.Dropdown(schedule_labels, value="Automatic", label="Schedule type", elem_id="txt2img_scheduler")
            c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
            with gr.Accordion("Hires. fix", open=False):
                c["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id="txt2img_enable_hr")
                with gr.Row():
                    c["hr_upscaler"] = gr.Dropdown(HIRES_UPSCALERS, value="Latent", label="Upscaler")
                    c["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: same as sampling steps)")
                    c["denoising_strength"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength")
                with gr.Row():
                    c["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by")
                    c["hr_resize_x"] = gr.Slider(0, 4096, value=0, step=8, label="Resize width to")
                    c["hr_resize_y"] = gr.Slider(0, 4096, value=0, step=8, label="Resize height to")
            with gr.Row():
                with gr.Column():
                    c["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    c["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                with gr.Column():
                    c["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count")
                    c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
            c["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            with gr.Row():
                c["seed"] = gr.Number(-1, label="Seed", precision=0, elem_id="txt2img_seed")
                random_seed = gr.Button("\U0001f3b2", elem_id="txt2img_random_seed", size="sm", min_width=40)
                reuse_seed = gr.Button("\u267b\ufe0f", elem_id="txt2img_reuse_seed", size="sm", min_width=40)
            with gr.Accordion("Variation seed", open=False):
                with gr.Row():
                    c["subseed"] = gr.Number(-1, label="Variation seed", precision=0)
                    c["subseed_strength"] = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength")
                with gr.Row():
                    c["seed_resize_from_w"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width")
                    c["seed_resize_from_h"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height")
            with gr.Row():
                c["tiling"] = gr.Checkbox(False, label="Tiling", elem_id="txt2img_tiling")
                c["clip_skip"] = gr.Slider(1, 12, value=service.options["CLIP_stop_at_last_layers"], step=1, label="Clip skip")
        with gr.Column(scale=1):
            progress = gr.HTML(elem_id="txt2img_progress")
            preview = gr.Image(label="Live preview", interactive=False, visible=True, height=256, elem_id="txt2img_preview")
            gallery = gr.Gallery(label="Output", columns=4, height=512, elem_id="txt2img_gallery", format="png")
            info = gr.HTML(elem_id="txt2img_info")
    last_seed = gr.State(-1)
    infotexts = gr.State([])

    inputs = [checkpoint, vae] + [c[name] for name in FIELDS]

    def make_request(values: list) -> Txt2ImgRequest:
        ckpt, vae_choice, *rest = values
        fields = dict(zip(FIELDS, rest))
        clip_skip = int(fields.pop("clip_skip"))
        overrides = {"CLIP_stop_at_last_layers": clip_skip}
        if ckpt:
            overrides["sd_model_checkpoint"] = ckpt
        if vae_choice:
            overrides["sd_vae"] = vae_choice
        for key in ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "seed_resize_from_w",
                    "seed_resize_from_h", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
            fields[key] = int(fields[key] if fields[key] is not None else -1)
        fields["scheduler"] = fields["scheduler"] or "Automatic"
        return Txt2ImgRequest(**fields, override_settings=overrides, save_images=True)

    def on_generate(*values):
        try:
            req = make_request(list(values))
            job = service.submit_txt2img(req)
        except (UserError, BackendError) as exc:
            yield gr.update(), "", None, info_html(exc.message, error=True), gr.update(), gr.update()
            return
        for progress_html, img in wait_with_updates(job, service.client):
            yield gr.update(), progress_html, img if img is not None else gr.update(), gr.update(), gr.update(), gr.update()
        if job.error is not None:
            yield gr.update(), "", None, info_html(getattr(job.error, "message", str(job.error)), error=True), gr.update(), gr.update()
            return
        result = job.result
        pictures = [(Image.open(io.BytesIO(img.png)), None) for img in result.images]
        texts = [img.infotext for img in result.images]
        first = next((img for img in result.images if not img.is_grid), None)
        notes = "\n".join(result.warnings + (["Interrupted."] if result.interrupted else []))
        shown = (first.infotext if first else "") + (f"\n{notes}" if notes else "")
        yield pictures, "", None, info_html(shown), (first.seed if first else -1), texts

    generate.click(on_generate, inputs=inputs, outputs=[gallery, progress, preview, info, last_seed, infotexts],
                   concurrency_limit=None)
    c["prompt"].submit(on_generate, inputs=inputs, outputs=[gallery, progress, preview, info, last_seed, infotexts],
                       concurrency_limit=None)
    interrupt.click(lambda: service.interrupt(), queue=False)
    skip.click(lambda: service.skip(), queue=False)
    random_seed.click(lambda: -1, outputs=[c["seed"]], queue=False)
    reuse_seed.click(lambda s: s, inputs=[last_seed], outputs=[c["seed"]], queue=False)

    def on_select(texts: list, evt: gr.SelectData):
        if texts and 0 <= evt.index < len(texts):
            return info_html(texts[evt.index])
        return gr.update()

    gallery.select(on_select, inputs=[infotexts], outputs=[info], queue=False)
    return c
