"""The txt2img tab: A1111's controls, a live progress bar and preview, Interrupt and Skip."""
from __future__ import annotations

import gradio as gr

from backend.core.schemas import Txt2ImgRequest
from backend.service import EaselService

from ui import extension_parts, extra_networks, generation, paste_params, refiner, scripts

# Request fields the tab edits, in the order of the `inputs` list.
FIELDS = ["prompt", "negative_prompt", "styles", "sampler_name", "scheduler", "steps", "width", "height", "batch_size", "n_iter",
          "cfg_scale", "seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "tiling",
          "restore_faces", "clip_skip", "enable_hr", "hr_upscaler", "hr_second_pass_steps", "denoising_strength",
          "hr_scale", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "override_choices", "refiner_enabled",
          "refiner_checkpoint", "refiner_switch_at", "distilled_cfg_scale"]


def build(service: EaselService, checkpoint: gr.Dropdown, vae: gr.Dropdown) -> tuple[dict, dict]:
    """Lay out the tab. Returns (field components by request-field name, result components)."""
    c: dict[str, gr.components.Component] = {}
    buttons = generation.prompt_row(service, "txt2img", c)
    extra_networks.build_panel(service, "txt2img", buttons["extra_networks"])
    with gr.Row():
        with gr.Column(scale=1):
            generation.sampler_controls(service, "txt2img", c)
            with gr.Accordion("Hires. fix", open=False):
                c["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id="txt2img_enable_hr")
                # A1111's two rows, with its short labels kept on one line (the number box moves under a long label).
                with gr.Row(elem_id="txt2img_hires_fix_row1", elem_classes=["easel-compact-sliders"]):
                    c["hr_upscaler"] = gr.Dropdown(service.postprocess.hires_upscaler_names(), value="Latent", label="Upscaler",
                                                   elem_id="txt2img_hr_upscaler")
                    c["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                                          elem_id="txt2img_hires_steps")  # 0: the sampling steps
                    c["denoising_strength"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                        elem_id="txt2img_denoising_strength")
                with gr.Row(elem_id="txt2img_hires_fix_row2", elem_classes=["easel-compact-sliders"]):
                    c["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                    c["hr_resize_x"] = gr.Slider(0, 4096, value=0, step=8, label="Resize width to",
                                                 elem_id="txt2img_hr_resize_x")
                    c["hr_resize_y"] = gr.Slider(0, 4096, value=0, step=8, label="Resize height to",
                                                 elem_id="txt2img_hr_resize_y")
                with gr.Row(elem_id="txt2img_hires_fix_row3"):
                    c["hr_checkpoint_name"] = refiner.hires_checkpoint(service, "txt2img")
            refiner.build(service, "txt2img", c)
            with gr.Row():
                with gr.Column():
                    c["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    c["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                    generation.swap_size_button("txt2img", c)
                with gr.Column():
                    generation.batch_controls("txt2img", c)
            with gr.Row():
                c["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                c["distilled_cfg_scale"] = generation.distilled_cfg_slider("txt2img")
            buttons.update(generation.seed_controls("txt2img", c))
            generation.extra_controls(service, "txt2img", c)
            c["restore_faces"] = gr.Checkbox(False, label="Restore faces", elem_id="txt2img_restore_faces",
                                             info="Settings: face restoration model and CodeFormer weight")
            ext_panel = extension_parts.build_generation_parts(service, "txt2img", checkpoint=checkpoint,
                                                              width=c["width"], height=c["height"])
            script_panel = scripts.build(service, "txt2img")
        with gr.Column(scale=1):
            r = generation.results_column(service, "txt2img")

    inputs = [checkpoint, vae] + [c[name] for name in FIELDS] + ext_panel.inputs + script_panel.inputs
    n_base = 2 + len(FIELDS)
    n_ext = n_base + len(ext_panel.inputs)

    def make_request(values: list) -> Txt2ImgRequest:
        ckpt, vae_choice, *rest = values[:n_base]
        fields = refiner.request_fields(generation.clean_fields(dict(zip(FIELDS, rest))))
        overrides = generation.overrides_from(ckpt, vae_choice, fields.pop("clip_skip"))
        overrides.update(paste_params.overrides_from(service, fields.pop("override_choices")))
        return Txt2ImgRequest(**fields, override_settings=overrides, save_images=True,
                              alwayson_scripts={**ext_panel.alwayson_scripts(values[n_base:n_ext]),
                                                **script_panel.alwayson_scripts(values[n_ext:])},
                              **script_panel.request_fields(values[n_ext:]))

    async def on_generate(*values):
        async for update in generation.stream_job(service, lambda: service.submit_txt2img(make_request(list(values)))):
            yield update

    generation.wire_results(service, r, buttons, c, on_generate, inputs)
    paste_params.wire_paste_button(service, "txt2img", buttons["paste"], c, r, checkpoint)
    return c, r
