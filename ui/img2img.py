"""The img2img tab: img2img, Sketch, Inpaint, Inpaint sketch, Inpaint upload and Batch, as in A1111."""
from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from backend.core import image_prep

from backend.core import request_checks
from backend.core.errors import UserError
from backend.core.schemas import Img2ImgRequest
from backend.service import EaselService

from ui import extension_parts, extra_networks, generation, interrogate, paste_params, refiner, scripts

MODES = ["img2img", "sketch", "inpaint", "inpaint_sketch", "inpaint_upload", "batch"]
MODE_LABELS = {"img2img": "img2img", "sketch": "Sketch", "inpaint": "Inpaint", "inpaint_sketch": "Inpaint sketch",
               "inpaint_upload": "Inpaint upload", "batch": "Batch"}
OUTPAINTING = ("Poor man's outpainting", "Outpainting mk2")  # scripts that make their own mask
SOURCES = ["upload", "clipboard", "webcam"]  # where a picture can come from, as A1111 offers
INPAINT_MODES = ("inpaint", "inpaint_sketch", "inpaint_upload")  # the sub-tabs that show "Inpaint options"
# The inpaint brush: white at half opacity, so the picture shows through the mask; any paint counts as masked.
MASK_BRUSH = gr.Brush(colors=[("#ffffff", 0.5)], color_mode="fixed", default_size=24)
SKETCH_COLORS = ["#000000", "#ffffff", "#e53935", "#fb8c00", "#fdd835", "#43a047", "#1e88e5", "#8e24aa", "#6d4c41"]

# Request fields the tab edits, in the order of the `inputs` list (after the images and mode controls).
FIELDS = ["prompt", "negative_prompt", "styles", "sampler_name", "scheduler", "steps", "width", "height", "batch_size", "n_iter",
          "cfg_scale", "seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "tiling",
          "restore_faces", "clip_skip", "denoising_strength", "resize_mode", "mask_blur", "inpainting_mask_invert", "inpainting_fill",
          "inpaint_full_res", "inpaint_full_res_padding", "override_choices", "refiner_enabled", "refiner_checkpoint",
          "refiner_switch_at", "distilled_cfg_scale"]
EXTRA = ["scale_mode", "scale_by", "batch_input_dir", "batch_output_dir", "batch_mask_dir"]


def drawn_mask(layers: list, size: tuple[int, int]) -> Image.Image | None:
    """White where any brush layer has paint (its alpha), black elsewhere; None when nothing is drawn."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for layer in layers or []:
        if layer is None:
            continue
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        if layer.size != size:
            layer = layer.resize(size, Image.Resampling.NEAREST)
        alpha = np.asarray(layer.convert("RGBA").getchannel("A"))
        mask = np.maximum(mask, alpha)
    if mask.max() == 0:
        return None
    return Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), "L")


def image_and_mask(mode: str, init_image, sketch: dict | None, inpaint: dict | None, inpaint_sketch: dict | None,
                   upload_image, upload_mask) -> tuple[Image.Image, Image.Image | None]:
    """What each sub-tab sends to the backend: (init image, mask or None)."""
    what = MODE_LABELS.get(mode, mode)
    if mode == "img2img":
        if init_image is None:
            raise UserError("Upload an image in the img2img tab first.")
        return image_prep.flatten(init_image), None
    if mode == "inpaint_upload":
        if upload_image is None or upload_mask is None:
            raise UserError("Inpaint upload needs both an image and a mask.")
        return image_prep.flatten(upload_image), upload_mask
    editor = {"sketch": sketch, "inpaint": inpaint, "inpaint_sketch": inpaint_sketch}.get(mode)
    if mode not in ("sketch", "inpaint", "inpaint_sketch"):
        raise UserError(f"Unknown img2img mode {mode!r}.")
    background = (editor or {}).get("background")
    if background is None:
        raise UserError(f"Upload an image in the {what} tab first.")
    background = image_prep.flatten(background)
    if mode == "sketch":
        composite = editor.get("composite")
        return (image_prep.flatten(composite) if composite is not None else background), None
    mask = drawn_mask(editor.get("layers") or [], background.size)
    if mask is None:
        raise UserError(f"Draw a mask on the image in the {what} tab first (the brush marks what to repaint).")
    if mode == "inpaint":
        return background, mask
    composite = editor.get("composite")
    return (image_prep.flatten(composite) if composite is not None else background), mask


def build(service: EaselService, checkpoint: gr.Dropdown, vae: gr.Dropdown) -> tuple[dict, dict, dict]:
    """Lay out the tab. Returns (fields, results, image inputs) for PNG Info and the Send to buttons."""
    c: dict[str, gr.components.Component] = {}
    buttons = generation.prompt_row(service, "img2img", c)
    extra_networks.build_panel(service, "img2img", buttons["extra_networks"])
    images: dict = {}
    mode = gr.State("img2img")
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id="mode_img2img") as sub_tabs:
                with gr.Tab("img2img", id="img2img", elem_id="img2img_img2img_tab") as t_img:
                    images["init_image"] = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA",
                                                    sources=SOURCES, format="png", height=420,
                                                    elem_id="img2img_image")
                with gr.Tab("Sketch", id="sketch", elem_id="img2img_img2img_sketch_tab") as t_sketch:
                    images["sketch"] = gr.ImageEditor(label="Image for img2img (draw on it)", type="pil", format="png",
                                                      brush=gr.Brush(colors=SKETCH_COLORS, color_mode="defaults"),
                                                      sources=SOURCES, layers=False, height=420,
                                                      elem_id="img2img_sketch")
                with gr.Tab("Inpaint", id="inpaint", elem_id="img2img_inpaint_tab") as t_inpaint:
                    images["inpaint"] = gr.ImageEditor(label="Image for inpainting with mask", type="pil", format="png",
                                                       brush=MASK_BRUSH,
                                                       sources=SOURCES, layers=False, height=420,
                                                       elem_id="img2maskimg")
                with gr.Tab("Inpaint sketch", id="inpaint_sketch", elem_id="img2img_inpaint_sketch_tab") as t_isketch:
                    images["inpaint_sketch"] = gr.ImageEditor(label="Color sketch inpainting", type="pil", format="png",
                                                              brush=gr.Brush(colors=SKETCH_COLORS, color_mode="defaults"),
                                                              sources=SOURCES, layers=False, height=420,
                                                              elem_id="inpaint_sketch")
                with gr.Tab("Inpaint upload", id="inpaint_upload", elem_id="img2img_inpaint_upload_tab") as t_upload:
                    images["upload_image"] = gr.Image(label="Image", type="pil", image_mode="RGBA", format="png",
                                                      elem_id="img_inpaint_base")
                    images["upload_mask"] = gr.Image(label="Mask (white = repaint)", type="pil", image_mode="RGBA",
                                                     format="png", elem_id="img_inpaint_mask")
                with gr.Tab("Batch", id="batch", elem_id="img2img_batch_tab") as t_batch:
                    gr.Markdown("Process every image of a folder. Masks (optional) are matched by file name. "
                                "When the UI is shared on a network, folders must be inside the data folder.")
                    c["batch_input_dir"] = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                    c["batch_output_dir"] = gr.Textbox(label="Output directory (empty: the img2img output folder)",
                                                       elem_id="img2img_batch_output_dir")
                    c["batch_mask_dir"] = gr.Textbox(label="Inpaint batch mask directory (optional)",
                                                     elem_id="img2img_batch_inpaint_mask_dir")
            for tab, name in ((t_img, "img2img"), (t_sketch, "sketch"), (t_inpaint, "inpaint"),
                              (t_isketch, "inpaint_sketch"), (t_upload, "inpaint_upload"), (t_batch, "batch")):
                tab.select(lambda n=name: n, outputs=[mode], queue=False)

            c["resize_mode"] = gr.Radio(request_checks.RESIZE_MODES, value="Just resize", type="index", label="Resize mode",
                                        elem_id="img2img_resize_mode")
            generation.sampler_controls(service, "img2img", c)
            refiner.build(service, "img2img", c)
            with gr.Accordion("Inpaint options", open=True, visible=False,
                              elem_id="img2img_inpaint_controls") as inpaint_options:
                with gr.Row():
                    c["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur")
                    c["inpainting_mask_invert"] = gr.Radio(image_prep.MASK_MODES, value=image_prep.MASK_MODES[0], type="index",
                                                           label="Mask mode", elem_id="img2img_mask_mode")
                c["inpainting_fill"] = gr.Radio(image_prep.MASKED_CONTENT, value="original", type="index",
                                                label="Masked content", elem_id="img2img_inpainting_fill")
                with gr.Row():
                    c["inpaint_full_res"] = gr.Radio(image_prep.INPAINT_AREAS, value="Whole picture", type="index",
                                                     label="Inpaint area", elem_id="img2img_inpaint_full_res")
                    c["inpaint_full_res_padding"] = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                                              elem_id="img2img_inpaint_full_res_padding")
            # "Inpaint options" shows only on the inpaint sub-tabs, as in A1111: a sub-tab's select event sets it
            # with the mode (unqueued, so it fires no State change), and a Send to button or PNG Info that selects a
            # sub-tab sets the mode in a queued event, whose State change sets it.
            for tab, name in ((t_img, "img2img"), (t_sketch, "sketch"), (t_inpaint, "inpaint"),
                              (t_isketch, "inpaint_sketch"), (t_upload, "inpaint_upload"), (t_batch, "batch")):
                tab.select(lambda n=name: gr.update(visible=n in INPAINT_MODES), outputs=[inpaint_options], queue=False)
            mode.change(lambda n: gr.update(visible=n in INPAINT_MODES), inputs=[mode], outputs=[inpaint_options],
                        queue=False)
            with gr.Row():
                c["scale_mode"] = gr.Radio(["Resize to", "Resize by"], value="Resize to", label="Size",
                                           elem_id="img2img_scale_mode")
                c["scale_by"] = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id="img2img_scale")
            with gr.Row():
                with gr.Column():
                    c["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="img2img_width")
                    c["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="img2img_height")
                    with gr.Row():
                        generation.swap_size_button("img2img", c)
                        detect = gr.Button("Size from image", size="sm", elem_id="img2img_detect_image_size_btn",
                                           elem_classes=["easel-tool"])
                with gr.Column():
                    generation.batch_controls("img2img", c)
            with gr.Row():
                c["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="img2img_cfg_scale")
                c["distilled_cfg_scale"] = generation.distilled_cfg_slider("img2img")
                c["denoising_strength"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                                    elem_id="img2img_denoising_strength")
            buttons.update(generation.seed_controls("img2img", c))
            generation.extra_controls(service, "img2img", c)
            c["restore_faces"] = gr.Checkbox(False, label="Restore faces", elem_id="img2img_restore_faces",
                                             info="Settings: face restoration model and CodeFormer weight")
            ext_panel = extension_parts.build_generation_parts(service, "img2img", checkpoint=checkpoint,
                                                              width=c["width"], height=c["height"])
            script_panel = scripts.build(service, "img2img")
        with gr.Column(scale=1):
            r = generation.results_column(service, "img2img")

    image_inputs = [images[k] for k in ("init_image", "sketch", "inpaint", "inpaint_sketch", "upload_image", "upload_mask")]
    inputs = [checkpoint, vae, mode] + image_inputs + [c[name] for name in FIELDS + EXTRA] + ext_panel.inputs
    n_base = len(inputs) - len(ext_panel.inputs)
    n_ext = len(inputs)
    inputs += script_panel.inputs

    async def on_generate(*values):
        async for update in generation.stream_job(service, lambda: submit(list(values))):
            yield update

    def submit(values: list):
        values, ext_values, script_values = values[:n_base], values[n_base:n_ext], values[n_ext:]
        ckpt, vae_choice, mode_name, *rest = values
        pictures, rest = rest[:len(image_inputs)], rest[len(image_inputs):]
        fields = dict(zip(FIELDS + EXTRA, rest))
        extra = {k: fields.pop(k) for k in EXTRA}
        fields = refiner.request_fields(generation.clean_fields(fields))
        fields["inpaint_full_res"] = bool(fields["inpaint_full_res"])
        overrides = generation.overrides_from(ckpt, vae_choice, fields.pop("clip_skip"))
        overrides.update(paste_params.overrides_from(service, fields.pop("override_choices")))
        request = dict(fields, override_settings=overrides, save_images=True)
        request["alwayson_scripts"] = ext_panel.alwayson_scripts(ext_values)
        request["alwayson_scripts"].update(script_panel.alwayson_scripts(script_values))
        request.update(script_panel.request_fields(script_values))
        outpainting = request.get("script_name") in OUTPAINTING
        if mode_name == "batch":
            return service.submit_img2img_batch(Img2ImgRequest(**request), extra["batch_input_dir"] or "",
                                                extra["batch_output_dir"] or "", extra["batch_mask_dir"] or "")
        image, mask = image_and_mask(mode_name, *pictures)
        if outpainting:
            mask = None  # outpainting makes its own mask of the new area
        if extra["scale_mode"] == "Resize by":
            request["width"] = max(64, int(round(image.width * float(extra["scale_by"]) / 8)) * 8)
            request["height"] = max(64, int(round(image.height * float(extra["scale_by"]) / 8)) * 8)
        return service.submit_img2img(Img2ImgRequest(**request), [image], mask)

    generation.wire_results(service, r, buttons, c, on_generate, inputs)

    def size_from_image(mode_name, *pictures):
        """📐: width and height of the picture in the current sub-tab (a multiple of 8, as the sizes are)."""
        picture = dict(zip(("img2img", "sketch", "inpaint", "inpaint_sketch", "inpaint_upload"), pictures)).get(mode_name)
        if isinstance(picture, dict):  # an editor: its background picture
            picture = picture.get("background")
        if picture is None:
            gr.Warning("No picture in this sub-tab to take the size from.")
            return gr.update(), gr.update()
        return picture.width // 8 * 8, picture.height // 8 * 8

    detect.click(size_from_image, [mode] + image_inputs[:5], [c["width"], c["height"]], queue=False)
    for button, model in ((buttons["interrogate"], "clip"), (buttons["deepbooru"], "deepdanbooru")):
        interrogate.wire(service, button, model, mode, image_inputs[:5], c["prompt"], buttons["status"])
    paste_params.wire_paste_button(service, "img2img", buttons["paste"], c, r, checkpoint)
    images["sub_tabs"] = sub_tabs
    images["mode"] = mode
    return c, r, images
