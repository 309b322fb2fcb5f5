"""ControlNet in the UI: the units panel of the generation tabs and the top-level ControlNet tab.

`build_units(service, tab_name, checkpoint=None, img2img=False)` lays out an accordion with one
sub-tab per unit (the `control_net_unit_count` setting, 3 by default), each with sd-webui-controlnet's
controls, and returns a `UnitsPanel`: its `inputs` go at the end of the tab's event inputs, and
`alwayson_scripts(values)` turns their values into the request's `alwayson_scripts`.
`build_tab(service)` is the ControlNet tab: models, preprocessors, and a detect tool.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from backend.client import BackendError
from backend.core import control_types
from backend.core.preprocessor_catalog import all_preprocessors, find_preprocessor
from backend.controlnet.units import CONTROL_MODES, RESIZE_MODES
from backend.core.errors import UserError
from backend.service import EaselService

UNIT_FIELDS = ["enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode",
               "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b"]


def _error(exc: Exception) -> str:
    return f'<div class="easel-error">{html.escape(getattr(exc, "message", str(exc)))}</div>'


def accordion_title(*enabled) -> str:
    """The accordion's title: "ControlNet", and the number of enabled units when there are any."""
    n = sum(1 for e in enabled if e)
    return f"ControlNet - {n} unit{'' if n == 1 else 's'}" if n else "ControlNet"


def unit_title(index: int, enabled: bool, module: str | None) -> str:
    """A unit tab's title: "ControlNet Unit 0", with the control type of its preprocessor while it is enabled."""
    title = f"ControlNet Unit {index}"
    if not enabled:
        return title
    try:
        kind = control_types.label_of(find_preprocessor(module).control_type)
    except UserError:
        kind = "All"
    return f"{title} [{kind if kind != 'All' else (module or 'none')}]"


def _slider_updates(module: str):
    """Updates for (resolution, threshold A, threshold B) sliders to the module's sliders and defaults."""
    try:
        pre = find_preprocessor(module)
    except UserError:
        return gr.update(visible=False), gr.update(visible=False), gr.update(visible=False)
    out = []
    for s in (pre.resolution, pre.threshold_a, pre.threshold_b):
        if s is None:
            out.append(gr.update(visible=False))
        else:
            out.append(gr.update(visible=True, label=s.name, minimum=s.min, maximum=s.max, step=s.step, value=s.value))
    return tuple(out)


@dataclass
class UnitsPanel:
    inputs: list
    count: int
    img2img: bool

    def alwayson_scripts(self, values: list) -> dict:
        """The values of `inputs` -> {"controlnet": {"args": [unit, ...]}} (images as PIL)."""
        per = len(UNIT_FIELDS) + (1 if self.img2img else 0)
        args = []
        for i in range(self.count):
            chunk = values[i * per:(i + 1) * per]
            unit = dict(zip(UNIT_FIELDS, chunk))
            if self.img2img and chunk[-1]:  # "use the img2img image": no image of its own
                unit["image"] = None
            module = unit.get("module") or "none"
            try:
                pre = find_preprocessor(module)
                if pre.resolution is None:
                    unit["processor_res"] = -1
                if pre.threshold_a is None:
                    unit["threshold_a"] = -1
                if pre.threshold_b is None:
                    unit["threshold_b"] = -1
            except UserError:
                pass
            unit["model"] = unit.get("model") or "None"
            args.append(unit)
        return {"controlnet": {"args": args}}


def build_units(service: EaselService, tab_name: str, checkpoint: gr.Dropdown | None = None,
                img2img: bool = False, width: gr.components.Component | None = None,
                height: gr.components.Component | None = None) -> UnitsPanel:
    """The units panel; `checkpoint` filters the model lists by its type, `width`/`height` serve Pixel Perfect previews."""
    count = int(service.options["control_net_unit_count"])
    modules = [p.name for p in all_preprocessors()]
    inputs: list = []
    model_dropdowns = []
    type_radios = []
    enable_boxes = []

    def models_for(title) -> list[str]:
        ckpt = None
        try:
            ckpt = service.current_checkpoint(title or None)
        except UserError:
            pass
        return service.components["controlnet"].model_titles(ckpt)

    def type_models(kind, title) -> list[str]:
        return control_types.models_for(kind or "All", models_for(title))

    with gr.Accordion("ControlNet", open=False, elem_id=f"{tab_name}_controlnet") as accordion:
        with gr.Tabs():
            for i in range(count):
                prefix = f"{tab_name}_controlnet_unit{i}"
                with gr.Tab(f"ControlNet Unit {i}", id=f"{prefix}_tab", elem_id=f"{prefix}_tab") as unit_tab:
                    with gr.Row():
                        image = gr.Image(label="Control image", type="pil", sources=["upload", "clipboard", "webcam"],
                                         elem_id=f"{prefix}_image", height=256)
                        preview = gr.Image(label="Preprocessor preview", type="pil", interactive=False,
                                           elem_id=f"{prefix}_preview", height=256)
                    with gr.Row():
                        enabled = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enable")
                        pixel_perfect = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{prefix}_pixel_perfect")
                        use_init = gr.Checkbox(False, label="Use the img2img image (also when none is uploaded)",
                                               visible=img2img, elem_id=f"{prefix}_use_img2img")
                    control_type = gr.Radio(control_types.control_type_names(), value="All", label="Control Type",
                                            elem_id=f"{prefix}_control_type")
                    # The preprocessor and the model each get a full row: model titles are long (name [hash]).
                    with gr.Row(equal_height=True):
                        module = gr.Dropdown(modules, value="none", label="Preprocessor", elem_id=f"{prefix}_module",
                                             scale=4)
                        run = gr.Button("Preview", elem_id=f"{prefix}_run_preprocessor", size="sm",
                                        min_width=90, scale=0)
                    with gr.Row(equal_height=True):
                        model = gr.Dropdown(models_for(None), value="None", label="Model", elem_id=f"{prefix}_model",
                                            scale=4)
                        refresh = gr.Button("\U0001f504", elem_id=f"{prefix}_refresh_models", size="sm", min_width=40,
                                            scale=0)
                    with gr.Row(elem_classes=["easel-compact-sliders"]):  # labels on one line
                        weight = gr.Slider(0, 2, value=1, step=0.05, label="Control Weight", elem_id=f"{prefix}_weight")
                        start = gr.Slider(0, 1, value=0, step=0.01, label="Starting Control Step", elem_id=f"{prefix}_start")
                        end = gr.Slider(0, 1, value=1, step=0.01, label="Ending Control Step", elem_id=f"{prefix}_end")
                    with gr.Row():
                        res = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution", visible=False,
                                        elem_id=f"{prefix}_processor_res")
                        thr_a = gr.Slider(0, 255, value=100, step=1, label="Threshold A", visible=False,
                                          elem_id=f"{prefix}_threshold_a")
                        thr_b = gr.Slider(0, 255, value=200, step=1, label="Threshold B", visible=False,
                                          elem_id=f"{prefix}_threshold_b")
                    control_mode = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode",
                                            elem_id=f"{prefix}_control_mode")
                    resize_mode = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize Mode",
                                           elem_id=f"{prefix}_resize_mode")
                    status = gr.HTML(elem_id=f"{prefix}_status")

                module.change(_slider_updates, inputs=[module], outputs=[res, thr_a, thr_b], queue=False)

                def on_control_type(kind, title=None):
                    """sd-webui-controlnet's filter: the type's preprocessors and models, its default picked."""
                    kind = kind or "All"
                    choices = type_models(kind, title)
                    return (gr.update(choices=control_types.modules_for(kind), value=control_types.default_module(kind)),
                            gr.update(choices=choices, value=control_types.default_model(kind, choices)))

                control_type.change(on_control_type, inputs=[control_type] + ([checkpoint] if checkpoint is not None else []),
                                    outputs=[module, model], queue=False)
                for trigger in (enabled.change, module.change):
                    trigger(lambda on, mod, i=i: gr.update(label=unit_title(i, on, mod)), inputs=[enabled, module],
                            outputs=[unit_tab], queue=False)

                def on_preview(img, mod, r, a, b, pp, rm, w=512, h=512):
                    if img is None:
                        return None, _error(UserError("Upload a control image first."))
                    try:
                        pre = find_preprocessor(mod)
                        if pp and pre.resolution is not None:
                            from backend.controlnet.units import pixel_perfect_resolution
                            r = pixel_perfect_resolution(img.width, img.height, int(w or 512), int(h or 512), rm)
                        out = service.components["controlnet"].detect(mod, [img], int(r) if pre.resolution else -1,
                                                        a if pre.threshold_a else -1, b if pre.threshold_b else -1)
                    except (UserError, BackendError) as exc:
                        return None, _error(exc)
                    return out[0], ""

                sizes = [width, height] if width is not None and height is not None else []
                run.click(on_preview, inputs=[image, module, res, thr_a, thr_b, pixel_perfect, resize_mode] + sizes,
                          outputs=[preview, status])

                def on_refresh(current, kind, title=None):
                    service.components["controlnet"].refresh()
                    choices = type_models(kind, title)
                    return gr.update(choices=choices, value=current if current in choices else "None")

                refresh.click(on_refresh, inputs=[model, control_type] + ([checkpoint] if checkpoint is not None else []),
                              outputs=[model], queue=False)
                model_dropdowns.append(model)
                type_radios.append(control_type)
                enable_boxes.append(enabled)
                inputs += [enabled, image, module, model, weight, start, end, control_mode, resize_mode, pixel_perfect,
                           res, thr_a, thr_b]
                if img2img:
                    inputs.append(use_init)

    for box in enable_boxes:
        box.change(lambda *on: gr.update(label=accordion_title(*on)), inputs=enable_boxes, outputs=[accordion],
                   queue=False)
    if checkpoint is not None:
        def on_checkpoint(title, *values):
            current, kinds = values[:count], values[count:]
            updates = []
            for c, kind in zip(current, kinds):
                choices = type_models(kind, title)
                updates.append(gr.update(choices=choices, value=c if c in choices else "None"))
            return updates

        checkpoint.change(on_checkpoint, inputs=[checkpoint] + model_dropdowns + type_radios, outputs=model_dropdowns,
                          queue=False)
    return UnitsPanel(inputs=inputs, count=count, img2img=img2img)


def build_tab(service: EaselService) -> None:
    """The ControlNet tab: the models found (and which checkpoint type each fits), the preprocessors, detect."""
    cn = service.components["controlnet"]

    def model_rows():
        rows = []
        for f in cn.registry.files:
            family = cn.registry.family_of(f)
            rows.append([f.title, {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}.get(family, "not readable"), f.name])
        return rows

    def module_rows():
        return [[p.name, p.display_name, "no" if p.model_free else "yes (" + ", ".join(p.weights) + ")",
                 ", ".join(s["name"] for s in p.sliders())] for p in all_preprocessors()]

    with gr.Row():
        with gr.Column():
            gr.Markdown(f"**Models** (from {', '.join(str(d) for d in cn.registry.folders)})")
            models = gr.Dataframe(model_rows(), headers=["Model", "For", "File"], interactive=False,
                                  elem_id="controlnet_models_table")
            refresh = gr.Button("Refresh models", elem_id="controlnet_refresh_models", size="sm")
            gr.Markdown(f"**Preprocessors** (annotator weights in {cn.annotators_dir})")
            gr.Dataframe(module_rows(), headers=["Preprocessor", "Also called", "Needs weights", "Settings"],
                         interactive=False, elem_id="controlnet_modules_table")
        with gr.Column():
            gr.Markdown("**Detect**: run a preprocessor on an image")
            image = gr.Image(label="Image", type="pil", sources=["upload", "clipboard", "webcam"],
                             elem_id="controlnet_detect_image",
                             height=256)
            module = gr.Dropdown([p.name for p in all_preprocessors()], value="canny", label="Preprocessor",
                                 elem_id="controlnet_detect_module")
            canny = find_preprocessor("canny")
            res = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution", elem_id="controlnet_detect_res")
            thr_a = gr.Slider(1, 255, value=canny.threshold_a.value, step=1, label=canny.threshold_a.name,
                              elem_id="controlnet_detect_threshold_a")
            thr_b = gr.Slider(1, 255, value=canny.threshold_b.value, step=1, label=canny.threshold_b.name,
                              elem_id="controlnet_detect_threshold_b")
            detect = gr.Button("Detect", variant="primary", elem_id="controlnet_detect_run")
            result = gr.Image(label="Detected map", type="pil", interactive=False, elem_id="controlnet_detect_result",
                              height=256)
            status = gr.HTML(elem_id="controlnet_detect_status")

    refresh.click(lambda: (cn.refresh(), model_rows())[1], outputs=[models], queue=False)
    module.change(_slider_updates, inputs=[module], outputs=[res, thr_a, thr_b], queue=False)

    def on_detect(img, mod, r, a, b):
        if img is None:
            return None, _error(UserError("Upload an image first."))
        try:
            pre = find_preprocessor(mod)
            out = cn.detect(mod, [img], int(r) if pre.resolution else -1, a if pre.threshold_a else -1,
                            b if pre.threshold_b else -1)
        except (UserError, BackendError) as exc:
            return None, _error(exc)
        return out[0], ""

    detect.click(on_detect, inputs=[image, module, res, thr_a, thr_b], outputs=[result, status])
