"""The Settings tab: every setting from `backend.options.SETTINGS`, saved to config.json on Apply."""
from __future__ import annotations

import gradio as gr

from backend import samplers
from backend.client import BackendError
from backend.errors import UserError
from backend.options import SETTINGS
from backend.service import EaselService


def _component(setting, value, service: EaselService):
    if setting.key == "sd_model_checkpoint":
        return gr.Dropdown(service.checkpoint_titles(), value=value or None, label=setting.label, allow_custom_value=True)
    if setting.key == "sd_vae":
        return gr.Dropdown(service.vae_choices(), value=value, label=setting.label)
    if setting.key == "default_sampler":
        return gr.Dropdown([s.name for s in samplers.SAMPLERS], value=value, label=setting.label)
    if setting.kind is bool:
        return gr.Checkbox(value, label=setting.label)
    if setting.choices:
        return gr.Dropdown(list(setting.choices), value=value, label=setting.label)
    if setting.kind in (int, float) and setting.minimum is not None and setting.maximum is not None:
        step = 1 if setting.kind is int else 0.01
        return gr.Slider(setting.minimum, setting.maximum, value=value, step=step, label=setting.label)
    if setting.kind in (int, float):
        return gr.Number(value, label=setting.label, precision=0 if setting.kind is int else None)
    return gr.Textbox(value, label=setting.label)


def build(service: EaselService):
    components = []
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        result = gr.HTML(elem_id="settings_result")
    sections: dict[str, list] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(s)
    for section, items in sections.items():
        with gr.Accordion(section, open=True):
            for s in items:
                components.append((s, _component(s, service.options[s.key], service)))

    def on_apply(*values):
        current = service.options.as_dict()
        changes = {s.key: v for (s, _), v in zip(components, values) if v != current.get(s.key)}
        try:
            applied = service.set_options(changes)
        except (UserError, BackendError) as exc:
            return f'<div class="easel-error">{exc.message}</div>'
        if not applied:
            return "Nothing changed."
        return f"{len(applied)} setting(s) changed: {', '.join(applied)}."

    apply.click(on_apply, inputs=[c for _, c in components], outputs=[result])
