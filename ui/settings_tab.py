"""The Settings tab: every setting from `backend.core.options.SETTINGS`, saved to config.json on Apply.

The tab shows what the server holds when the page loads (`current_values`, read by the page's load event), and
Apply sends only the settings the user changed since then: a page opened before another client (or another
tab) changed a setting never writes its old values back.
"""
from __future__ import annotations

import html
import re
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
    loaded: gr.JSON  # {key: value} as the page last read them from the server (hidden)
    defaults: tuple[gr.Button, gr.Button, gr.HTML]  # the Defaults section's View changes, Apply, and their answer

    def outputs(self) -> list:
        """The components to refresh from the server, then the state of what they show."""
        return list(self.components.values()) + [self.loaded]

    def refreshed(self, service: EaselService) -> list:
        """Updates for `outputs()`: every field, and the choices of the model lists, as the server has them now."""
        values = current_values(service)
        updates = []
        for key in self.components:
            updates.append(field_update(service, key, values[key]))
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


def to_store(loaded: dict[str, Any], shown: dict[str, Any], current: dict[str, Any],
             settings: list[Setting] | None = None) -> dict[str, Any]:
    """What Apply stores: the user's changes (`changed` since the page loaded) less those the server already holds
    (`current`), so its answer counts the settings it changed, as A1111's does (a quick setting changed on this
    page updates the tab's field a moment before what it loaded)."""
    by_key = {s.key: s for s in (settings or SETTINGS)}
    return {key: value for key, value in changed(loaded, shown, settings).items()
            if key not in current or not _same(by_key[key], value, current[key])}


def _same(setting: Setting, a: Any, b: Any) -> bool:
    try:
        return coerce(setting, a) == coerce(setting, b)
    except UserError:
        return a == b


def _component(setting, value, service: EaselService, elem_id: str | None = None, **layout):
    """The control for `setting` (`elem_id`: default `settings_<key>`; `layout`: Gradio's scale, min_width...)."""
    elem_id = elem_id or f"settings_{setting.key}"
    if setting.key == "sd_model_checkpoint":
        return gr.Dropdown(service.checkpoint_titles(), value=value or None, label=setting.label, elem_id=elem_id,
                           allow_custom_value=True, **layout)
    if setting.key == "sd_vae":
        return gr.Dropdown(service.vae_choices(), value=value, label=setting.label, elem_id=elem_id, **layout)
    if setting.key == "default_sampler":
        return gr.Dropdown([s.name for s in sampler_catalog.SAMPLERS], value=value, label=setting.label, elem_id=elem_id,
                           **layout)
    if setting.key == "upscaler_for_img2img":  # A1111's dropdown of the upscalers (a name not there is kept)
        return gr.Dropdown(service.postprocess.upscaler_names(), value=value or "None", label=setting.label,
                           elem_id=elem_id, allow_custom_value=True, **layout)
    if setting.key == "quicksettings_list":
        keys = [s.key for s in service.options.settings() if s.kind is not list]
        return gr.Dropdown(keys, value=value, multiselect=True, label=setting.label, elem_id=elem_id, **layout)
    if setting.key == "interrogate_clip_skip_categories":  # the category files of models/interrogate
        return gr.Dropdown(service.interrogate.category_names(), value=value, multiselect=True, allow_custom_value=True,
                           label=setting.label, elem_id=elem_id, **layout)
    if setting.key.startswith("outdir_") and service.options.hide_dir_config:
        return gr.Textbox(value, label=setting.label, elem_id=elem_id, interactive=False,
                          info="Output folders cannot be changed on this server (--hide-ui-dir-config).", **layout)
    if setting.kind is bool:
        return gr.Checkbox(value, label=setting.label, elem_id=elem_id, **layout)
    if setting.choices:
        return gr.Dropdown(list(setting.choices), value=value, label=setting.label, elem_id=elem_id, **layout)
    if setting.kind in (int, float) and setting.minimum is not None and setting.maximum is not None:
        step = 1 if setting.kind is int else 0.01
        return gr.Slider(setting.minimum, setting.maximum, value=value, step=step, label=setting.label, elem_id=elem_id,
                         **layout)
    if setting.kind in (int, float):
        return gr.Number(value, label=setting.label, elem_id=elem_id, precision=0 if setting.kind is int else None,
                         **layout)
    return gr.Textbox(value, label=setting.label, elem_id=elem_id, **layout)


def shown_in_tab(setting: Setting) -> bool:
    """Whether the Settings tab (and so the quick settings) has a field for `setting`: lists of names have their own
    tab (disabled_extensions: the Extensions tab), except the quick settings' list; so have the Extensions tab's
    own choices."""
    if setting.key in EXTENSIONS_TAB_SETTINGS:
        return False
    return setting.kind is not list or setting.key in ("quicksettings_list", "interrogate_clip_skip_categories")


def field_update(service: EaselService, key: str, value: Any, **extra) -> dict:
    """An update showing `value` in a field of `key` (the model lists with their choices now)."""
    if key == "sd_model_checkpoint":
        return gr.update(choices=service.checkpoint_titles(), value=value or None, **extra)
    if key == "sd_vae":
        return gr.update(choices=service.vae_choices(), value=value, **extra)
    if key == "interrogate_clip_skip_categories":
        return gr.update(choices=service.interrogate.category_names(), value=value, **extra)
    return gr.update(value=value, **extra)


DEFAULTS = "Defaults"  # the sidebar's last entry: the tabs' controls' defaults (ui-config.json, ui/ui_config.py)


def section_id(section: str) -> str:
    """The element id of a section's column (ui/javascript/settings.js makes the same from the sidebar's names)."""
    return "settings_section_" + re.sub(r"[^a-z0-9_]+", "_", section.lower())


def build(service: EaselService, quick: dict[str, gr.components.Component]) -> SettingsTab:
    """Lay out the tab as AUTOMATIC1111 1.10: the sections in a sidebar with a search box (filtering the settings by
    label across sections: ui/javascript/settings.js), Apply and Reload UI; `quick`: the quick settings' fields by
    setting key, refreshed by Apply too."""
    initial = current_values(service)
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        reload = gr.Button("Reload UI", elem_id="settings_restart_gradio")
    result = gr.HTML(elem_id="settings_result")
    # what the page's fields showed when it was served (ui/live_page.py keeps both current for each new page);
    # "hidden", not visible=False: a field Gradio does not render drops the updates the quick settings send it
    loaded = gr.JSON(initial, visible="hidden", elem_id="settings_loaded")
    sections: dict[str, list] = {}
    for s in service.options.settings():  # Easel's own, then the extensions' (easel_extension.py, on_ui_settings)
        if shown_in_tab(s):
            sections.setdefault(s.section, []).append(s)
    components: dict[str, gr.components.Component] = {}
    with gr.Row(elem_id="settings"):
        with gr.Column(scale=1, min_width=200, elem_id="settings_sidebar"):
            gr.Textbox(placeholder="Search settings...", show_label=False, container=False, interactive=True,
                       elem_id="settings_search")
            gr.Radio(list(sections) + [DEFAULTS], value=next(iter(sections), None), show_label=False, container=False,
                     interactive=True, elem_id="settings_sections")
        with gr.Column(scale=5, elem_id="settings_body"):
            for section, items in sections.items():
                with gr.Column(elem_id=section_id(section), elem_classes=["easel-settings-section"]):
                    gr.HTML(f"<h2>{html.escape(section)}</h2>")
                    for s in items:
                        components[s.key] = _component(s, initial[s.key], service)
            with gr.Column(elem_id=section_id(DEFAULTS), elem_classes=["easel-settings-section"]):
                gr.HTML(f"<h2>{DEFAULTS}</h2><p>The default value of each control of the tabs is kept in "
                        f"{html.escape(str(service.paths.ui_config_file or 'ui-config.json'))}. View changes lists "
                        "the controls whose value on the page now differs; Apply saves those values as the defaults, "
                        "used from the next server start.</p>")
                with gr.Row():
                    view = gr.Button("View changes", elem_id="settings_defaults_view")
                    save = gr.Button("Apply", variant="primary", elem_id="settings_defaults_apply")
                defaults_result = gr.HTML(elem_id="settings_defaults_result")
    # the buttons' events need every control of the tabs: ui/layout.py wires them (ui_config.wire_defaults)
    tab = SettingsTab(components=components, loaded=loaded, defaults=(view, save, defaults_result))
    quick_keys = [key for key in components if key in quick]

    def on_apply(loaded: dict, *values):
        changes = to_store(loaded, dict(zip(components, values)), current_values(service),
                           service.options.settings())
        keep = [gr.update() for _ in tab.outputs()] + [gr.update() for _ in quick_keys]
        if not changes:
            return ["Nothing changed."] + keep
        try:
            applied = service.set_options(changes)
        except (UserError, BackendError) as exc:
            return [f'<div class="easel-error">{html.escape(exc.message)}</div>'] + keep
        now = tab.refreshed(service)
        shown = now[-1]
        quick_updates = [field_update(service, key, shown[key]) for key in quick_keys]
        message = html.escape(f"{len(applied)} setting(s) changed: {', '.join(applied)}.")
        return [message] + now + quick_updates

    apply.click(on_apply, inputs=[tab.loaded] + list(components.values()),
                outputs=[result] + tab.outputs() + [quick[key] for key in quick_keys])
    # as A1111's: the page again, built from what the server holds now (every page load reads the settings)
    reload.click(None, js="() => { window.location.reload(); }")
    return tab
