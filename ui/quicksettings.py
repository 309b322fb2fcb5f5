"""The quick settings at the top of the page: the settings `quicksettings_list` names, as AUTOMATIC1111 has them.

The row holds a field for every setting the Settings tab shows (`setting_<key>`), the listed ones visible, in the
list's order as it was at server start; each page load shows the list as it is then, so a changed list applies at
the next page load (Reload UI). A change made here passes the one settings gate (`EaselService.change_options`:
`Options.check/update`), and one that chooses a model (checkpoint, VAE) loads it as before (ui/layout.py wires
those two).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend.client import BackendError
from backend.core.errors import UserError
from backend.service import EaselService
from ui import model_parts, settings_tab

MODEL_KEYS = ("sd_model_checkpoint", "sd_vae")


@dataclass
class QuickSettings:
    components: dict[str, gr.components.Component]  # by setting key
    refresh: gr.Button  # the checkpoint list's refresh, shown with the checkpoint
    modules: gr.Dropdown  # "VAE / Text Encoder" (ui/model_parts.py), shown with the checkpoint
    # the column around each field other than the models' (shown or hidden): Gradio sizes a run of form fields in a
    # row by all of their widths, hidden ones included, so each field stands alone
    holders: dict[str, gr.Column]

    def outputs(self) -> list:
        return list(self.components.values()) + list(self.holders.values()) + [self.refresh, self.modules]

    def on_page_load(self, service: EaselService) -> list:
        """Updates for `outputs()`: the listed settings shown, with their values (the model fields' values are the
        page load's own in ui/layout.py)."""
        listed = set(listed_keys(service))
        updates = [gr.update(visible=key in listed) if key in MODEL_KEYS else gr.update(value=service.options[key])
                   for key in self.components]
        updates += [gr.update(visible=key in listed) for key in self.holders]
        return updates + [gr.update(visible="sd_model_checkpoint" in listed)] * 2


def listed_keys(service: EaselService) -> list[str]:
    """The settings `quicksettings_list` names that the page has a field for, in its order."""
    known = {s.key for s in service.options.settings() if settings_tab.shown_in_tab(s) and s.kind is not list}
    return [key for key in service.options["quicksettings_list"] if key in known]


def build(service: EaselService, current_title: str | None) -> QuickSettings:
    """The row (inside the page's Blocks); `current_title`: the checkpoint jobs use now."""
    listed = listed_keys(service)
    settings = [s for s in service.options.settings() if settings_tab.shown_in_tab(s) and s.kind is not list]
    settings.sort(key=lambda s: listed.index(s.key) if s.key in listed else len(listed))
    components: dict[str, gr.components.Component] = {}
    holders: dict[str, gr.Column] = {}
    refresh = modules = None
    with gr.Row(elem_id="quicksettings"):
        for s in settings:
            shown = s.key in listed
            if s.key == "sd_model_checkpoint":
                # allow_custom_value: titles change when a file's hash becomes known, and a Generate pressed before
                # the page load's refresh arrives must not fail Gradio's choices check; the settings gate checks
                # the names instead.
                components[s.key] = gr.Dropdown(service.checkpoint_titles(), value=current_title, label=s.label,
                                                elem_id="setting_sd_model_checkpoint", allow_custom_value=True,
                                                scale=4, visible=shown)
                refresh = gr.Button("\U0001f504", elem_id="refresh_sd_model_checkpoint", size="sm", min_width=40,
                                    scale=0, visible=shown)
                modules = model_parts.build(service, visible=shown)  # Forge's "VAE / Text Encoder" beside it
            elif s.key == "sd_vae":
                components[s.key] = gr.Dropdown(service.vae_choices(), value=service.options["sd_vae"], label=s.label,
                                                elem_id="setting_sd_vae", allow_custom_value=True, scale=2,
                                                visible=shown)
            else:
                with gr.Column(scale=2, min_width=160, visible=shown) as holders[s.key]:
                    components[s.key] = settings_tab._component(s, service.options[s.key], service,
                                                                elem_id=f"setting_{s.key}")
    return QuickSettings(components=components, refresh=refresh, modules=modules, holders=holders)


def wire(quick: QuickSettings, service: EaselService, tab: settings_tab.SettingsTab, notice: gr.HTML) -> None:
    """A change of a quick setting (other than the models, ui/layout.py) is stored through the gate; the Settings
    tab's field and what it loaded follow, so its Apply does not write the old value back."""
    for key, component in quick.components.items():
        if key in MODEL_KEYS or key not in tab.components:
            continue

        def on_change(value: Any, loaded: dict, key: str = key) -> list:
            message = gr.update()
            if not settings_tab.changed({key: service.options[key]}, {key: value}, service.options.settings()):
                return [message, gr.update(), gr.update(), loaded]
            try:
                service.change_options({key: value})
                problem = service.no_checkpoint_message()
                message = f'<div class="easel-error">{problem}</div>' if problem else ""
            except (UserError, BackendError) as exc:
                message = f'<div class="easel-error">{html.escape(exc.message)}</div>'
            now = service.options[key]
            return [message, gr.update(value=now), gr.update(value=now), dict(loaded, **{key: now})]

        outputs = [notice, component, tab.components[key], tab.loaded]
        if isinstance(component, gr.Slider):
            triggers = [component.release]
        elif isinstance(component, (gr.Textbox, gr.Number)):
            triggers = [component.submit, component.blur]
        else:
            triggers = [component.input]
        for trigger in triggers:
            trigger(on_change, inputs=[component, tab.loaded], outputs=outputs, queue=False)
