"""The Checkpoint Merger tab (A1111's): models A, B, C, the interpolation method and multiplier, format and precision,
config copy, VAE bake, discarded weights, metadata; the result (or the refusal) under the Merge button. The merge
is a backend job (`EaselService.submit_merge`); afterwards every checkpoint list, the one at the top included,
offers the new file."""
from __future__ import annotations

import html
import json

import anyio
import gradio as gr
from pydantic import ValidationError

from backend.client import BackendError
from backend.core.checkpoint_merge import CHECKPOINT_FORMATS, CONFIG_SOURCES, INTERP_METHODS, MergeRequest
from backend.core.errors import UserError
from backend.core.tensor_headers import read_safetensors_metadata
from backend.service import EaselService

from ui.progress import info_html, wait_with_updates

DESCRIPTIONS = {
    "No interpolation": "No interpolation will be used. Requires one model; A. Allows for format conversion and VAE "
                        "baking.",
    "Weighted sum": "A weighted sum will be used for interpolation. Requires two models; A and B. The result is "
                    "calculated as A * (1 - M) + B * M",
    "Add difference": "The difference between the last two models will be added to the first. Requires three "
                      "models; A, B and C. The result is calculated as A + (B - C) * M",
}


def _description(method: str) -> str:
    return f"<p>{html.escape(DESCRIPTIONS.get(method, ''))}</p>"


def read_metadata(service: EaselService, *names) -> str:
    """A1111's "Read metadata from selected checkpoints": their safetensors metadata, merged, as JSON."""
    metadata: dict = {}
    for name in names:
        if not name:
            continue
        try:
            found = service.registry.find_checkpoint(name)
        except UserError:
            continue
        if found.path.suffix.lower() == ".safetensors":
            try:
                metadata.update(read_safetensors_metadata(found.path))
            except UserError:
                continue
    return json.dumps(metadata, indent=4, ensure_ascii=False)


def build(service: EaselService, checkpoint: gr.components.Component | None = None) -> None:
    titles = service.checkpoint_titles()
    with gr.Column(variant="compact"):
        description = gr.HTML(_description("Weighted sum"), elem_id="modelmerger_interp_description")
        with gr.Row(elem_id="modelmerger_models"):
            models, refreshes = [], []
            for label, key, letter in (("Primary model (A)", "primary", "A"), ("Secondary model (B)", "secondary", "B"),
                                       ("Tertiary model (C)", "tertiary", "C")):
                models.append(gr.Dropdown(titles, value=None, label=label, elem_id=f"modelmerger_{key}_model_name",
                                          scale=4, min_width=100))
                refreshes.append(gr.Button("\U0001f504", elem_id=f"refresh_checkpoint_{letter}",
                                           size="sm", min_width=40, scale=0))
        custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name")
        multiplier = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                               elem_id="modelmerger_interp_amount")
        method = gr.Radio(list(INTERP_METHODS), value="Weighted sum", label="Interpolation Method",
                          elem_id="modelmerger_interp_method")
        with gr.Row():
            fmt = gr.Radio(list(CHECKPOINT_FORMATS[::-1]), value="safetensors", label="Checkpoint format",
                           elem_id="modelmerger_checkpoint_format")
            half = gr.Checkbox(False, label="Save as float16", elem_id="modelmerger_save_as_half")
        with gr.Row():
            config_source = gr.Radio(list(CONFIG_SOURCES), value="A, B or C", label="Copy config from",
                                     elem_id="modelmerger_config_method")
            vae = gr.Dropdown(["None"] + [f.name for f in service.registry.vaes], value="None",
                              label="Bake in VAE", elem_id="modelmerger_bake_in_vae", scale=4)
            refresh_vae = gr.Button("\U0001f504", elem_id="modelmerger_refresh_bake_in_vae", size="sm",
                                    min_width=40, scale=0)
        with gr.Row():
            discard = gr.Textbox("", label="Discard weights with matching name", elem_id="modelmerger_discard_weights")
            prune_ema = gr.Checkbox(False, label="Prune EMA weights (model_ema.*)", elem_id="modelmerger_prune_ema")
        with gr.Accordion("Metadata", open=False) as metadata_editor:
            with gr.Row():
                save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="modelmerger_save_metadata")
                add_recipe = gr.Checkbox(True, label="Add merge recipe metadata", elem_id="modelmerger_add_recipe")
                copy_fields = gr.Checkbox(True, label="Copy metadata from merged models",
                                          elem_id="modelmerger_copy_metadata")
            metadata_json = gr.Textbox("{}", lines=4, label="Metadata in JSON format",
                                       elem_id="modelmerger_metadata_json")
            read = gr.Button("Read metadata from selected checkpoints", elem_id="modelmerger_read_metadata")
        with gr.Row():
            merge = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge", scale=3)
            interrupt = gr.Button("Interrupt", elem_id="modelmerger_interrupt", scale=1)
        progress = gr.HTML(elem_id="modelmerger_progress")
        result = gr.HTML(elem_id="modelmerger_result")  # the outcome, under the Merge button

    method.change(_description, inputs=[method], outputs=[description], queue=False)
    fmt.change(lambda value: gr.update(visible=value == "safetensors"), inputs=[fmt], outputs=[metadata_editor],
               queue=False)
    read.click(lambda *names: read_metadata(service, *names), inputs=models, outputs=[metadata_json], queue=False)
    interrupt.click(lambda: service.interrupt(), queue=False)

    def refreshed_lists():
        service.refresh_checkpoints()
        return [gr.update(choices=service.checkpoint_titles()) for _ in models]

    for button in refreshes:
        button.click(refreshed_lists, outputs=models, queue=False)

    def on_refresh_vae():
        service.refresh_checkpoints()
        return gr.update(choices=["None"] + [f.name for f in service.registry.vaes])

    refresh_vae.click(on_refresh_vae, outputs=[vae], queue=False)
    list_outputs = models + ([checkpoint] if checkpoint is not None else [])

    def lists():
        choices = service.checkpoint_titles()
        return [gr.update(choices=choices) for _ in list_outputs]

    async def on_merge(a, b, c, method_value, m, half_value, name, fmt_value, config_value, vae_value, discard_value,
                       prune_value, save_value, recipe_value, copy_value, json_value):
        keep = [gr.update() for _ in list_outputs]
        try:
            req = MergeRequest(primary_model_name=a or "", secondary_model_name=b or None,
                               tertiary_model_name=c or None, interp_method=method_value, multiplier=float(m),
                               save_as_half=bool(half_value), custom_name=name or "", checkpoint_format=fmt_value,
                               config_source=config_value, bake_in_vae=vae_value or "None",
                               discard_weights=discard_value or "", prune_ema=bool(prune_value),
                               save_metadata=bool(save_value), add_merge_recipe=bool(recipe_value),
                               copy_metadata_fields=bool(copy_value), metadata_json=json_value or "{}")
            job = await anyio.to_thread.run_sync(service.submit_merge, req)
        except ValidationError as exc:
            yield [*keep, "", info_html(f"Invalid settings: {exc.errors()[0].get('msg')}", error=True)]
            return
        except (UserError, BackendError) as exc:
            yield [*keep, "", info_html(exc.message, error=True)]
            return
        async for progress_html, _preview in wait_with_updates(job, service.client):
            yield [*keep, progress_html, ""]
        if job.error is not None:
            yield [*lists(), "", info_html(getattr(job.error, "message", str(job.error)), error=True)]
            return
        text = f"Checkpoint saved to {job.result['path']}"
        for warning in job.result.get("warnings", []):
            text += f"\n{warning}"
        yield [*lists(), "", info_html(text)]

    merge.click(on_merge, inputs=[*models, method, multiplier, half, custom_name, fmt, config_source, vae, discard,
                                  prune_ema, save_metadata, add_recipe, copy_fields, metadata_json],
                outputs=[*list_outputs, progress, result], concurrency_limit=None)
