"""The Settings tab: every setting from `backend.core.options.SETTINGS`, saved to config.json on Apply.

The tab shows what the server holds when the page loads (`current_values`, read by the page's load event), and
Apply sends only the settings the user changed since then: a page opened before another client (or another
tab) changed a setting never writes its old values back.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend.core import sampler_catalog
from backend.client import BackendError
from backend.core.errors import UserError
from backend.core.options import SETTINGS, Setting, coerce
from backend.service import EaselService

# settings the Extensions tab sets (its "Disable all extensions" radio), not shown here, as in A1111
EXTENSIONS_TAB_SETTINGS = ("disable_all_extensions",)


@dataclass
class SettingsTab:
    components: dict[str, gr.components.Component]  # by setting key, in the order of the page
    loaded: gr.State  # {key: value} as the page last read them from the server

    def outputs(self) -> list:
        """The components to refresh from the server, then the state of what they show."""
        return list(self.components.values()) + [self.loaded]

    def refreshed(self, service: EaselService) -> list:
        """Updates for `outputs()`: every field, and the choices of the model lists, as the server has them now."""
        values = current_values(service)
        updates = []
        for key in self.components:
            if key == "sd_model_checkpoint":
                updates.append(gr.update(choices=service.checkpoint_titles(), value=values[key] or None))
            elif key == "sd_vae":
                updates.append(gr.update(choices=service.vae_choices(), value=values[key]))
            else:
                updates.append(gr.update(value=values[key]))
        return updates + [values]


def current_values(service: EaselService) -> dict[str, Any]:
    """The settings as the tab shows them: the stored values, and the checkpoint jobs use now (its title)."""
    values = {s.key: service.options[s.key] for s in service.options.settings()}
    try:
        values["sd_model_checkpoint"] = service.current_checkpoint().title
    except UserError:
        pass  # no checkpoint at all: show what is stored
    return values


def changed(loaded: dict[str, Any], shown: dict[str, Any], settings: list[Setting] | None = None) -> dict[str, Any]:
    """The settings whose shown value differs from the one the page loaded (compared as the setting holds them;
    `settings`: the table, with the extensions' settings, default Easel's own)."""
    by_key = {s.key: s for s in (settings or SETTINGS)}
    return {key: value for key, value in shown.items()
            if key not in loaded or not _same(by_key[key], value, loaded[key])}


def _same(setting: Setting, a: Any, b: Any) -> bool:
    try:
        return coerce(setting, a) == coerce(setting, b)
    except UserError:
        return a == b


def _component(setting, value, service: EaselService):
    elem_id = f"settings_{setting.key}"
    if setting.key == "sd_model_checkpoint":
        return gr.Dropdown(service.checkpoint_titles(), value=value or None, label=setting.label, elem_id=elem_id,
                           allow_custom_value=True)
    if setting.key == "sd_vae":
        return gr.Dropdown(service.vae_choices(), value=value, label=setting.label, elem_id=elem_id)
    if setting.key == "default_sampler":
        return gr.Dropdown([s.name for s in sampler_catalog.SAMPLERS], value=value, label=setting.label, elem_id=elem_id)
    if setting.key.startswith("outdir_") and service.options.hide_dir_config:
        return gr.Textbox(value, label=setting.label, elem_id=elem_id, interactive=False,
                          info="Output folders cannot be changed on this server (--hide-ui-dir-config).")
    if setting.kind is bool:
        return gr.Checkbox(value, label=setting.label, elem_id=elem_id)
    if setting.choices:
        return gr.Dropdown(list(setting.choices), value=value, label=setting.label, elem_id=elem_id)
    if setting.kind in (int, float) and setting.minimum is not None and setting.maximum is not None:
        step = 1 if setting.kind is int else 0.01
        return gr.Slider(setting.minimum, setting.maximum, value=value, step=step, label=setting.label, elem_id=elem_id)
    if setting.kind in (int, float):
        return gr.Number(value, label=setting.label, elem_id=elem_id, precision=0 if setting.kind is int else None)
    return gr.Textbox(value, label=setting.label, elem_id=elem_id)


def build(service: EaselService, quick: dict[str, gr.components.Component]) -> SettingsTab:
    """Lay out the tab; `quick`: the quick-settings dropdowns by setting key, refreshed by Apply too."""
    initial = current_values(service)
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        result = gr.HTML(elem_id="settings_result")
    sections: dict[str, list] = {}
    for s in service.options.settings():  # Easel's own, then the extensions' (easel_extension.py, on_ui_settings)
        if s.kind is list or s.key in EXTENSIONS_TAB_SETTINGS:
            continue  # lists of names, and the Extensions tab's own choices, are set in their tabs
        sections.setdefault(s.section, []).append(s)
    components: dict[str, gr.components.Component] = {}
    for section, items in sections.items():
        with gr.Accordion(section, open=True):
            for s in items:
                components[s.key] = _component(s, initial[s.key], service)
    tab = SettingsTab(components=components, loaded=gr.State(initial))
    quick_keys = [key for key in ("sd_model_checkpoint", "sd_vae") if key in quick]

    def on_apply(loaded: dict, *values):
        changes = changed(loaded, dict(zip(components, values)), service.options.settings())
        keep = [gr.update() for _ in tab.outputs()] + [gr.update() for _ in quick_keys]
        if not changes:
            return ["Nothing changed."] + keep
        try:
            applied = service.set_options(changes)
        except (UserError, BackendError) as exc:
            return [f'<div class="easel-error">{html.escape(exc.message)}</div>'] + keep
        now = tab.refreshed(service)
        shown = now[-1]
        quick_updates = [gr.update(choices=service.checkpoint_titles(), value=shown["sd_model_checkpoint"] or None)
                         if key == "sd_model_checkpoint" else gr.update(choices=service.vae_choices(), value=shown[key])
                         for key in quick_keys]
        message = html.escape(f"{len(applied)} setting(s) changed: {', '.join(applied)}.")
        return [message] + now + quick_updates

    apply.click(on_apply, inputs=[tab.loaded] + list(components.values()),
                outputs=[result] + tab.outputs() + [quick[key] for key in quick_keys])
    return tab
