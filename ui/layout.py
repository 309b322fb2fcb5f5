"""The whole web UI: the quick-settings row (checkpoint, VAE) and the tabs."""
from __future__ import annotations

import html

import gradio as gr

from backend.client import BackendError
from backend.downloads import download_file, network_available
from backend.core.errors import UserError
from backend.exposure import exposure_warnings
from backend.service import DEFAULT_MODEL_NAME, DEFAULT_MODEL_URL, EaselService

from ui import (extension_parts, extensions, extra_networks, extras, img2img, model_parts, page_scripts, pnginfo,
                quicksettings, send_to, settings_tab, txt2img, ui_config)
from ui import checkpoint_merger
from ui.live_page import LivePage

CSS = """
.easel-progress { position: relative; height: 24px; background: var(--block-background-fill); border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden; }
.easel-progress-bar { position: absolute; left: 0; top: 0; bottom: 0; background: var(--color-accent); opacity: .45; transition: width .3s; }
.easel-progress-text { position: relative; padding: 0 8px; line-height: 24px; font-size: 13px; }
.easel-error { color: #c62828; font-weight: 600; white-space: pre-wrap; }
.easel-compact-sliders .head > label { flex: 1 0 auto !important; white-space: nowrap; }
.easel-token-counter { text-align: right; font-size: 12px; opacity: .75; margin: -14px 8px -8px 0 !important; min-height: 0 !important; }
.easel-token-counter-long { color: var(--color-accent); }
.easel-infotext { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; word-break: break-word; }
"""


def build_ui(service: EaselService) -> gr.Blocks:
    from ui import extension_tabs
    added_tabs = extension_tabs.collect(service)  # extensions' on_ui_tabs: their own Blocks, made before the page's
    with gr.Blocks(title="Easel", analytics_enabled=False) as demo:
        live = demo.easel_live_page = LivePage(demo, subpath=getattr(service.args, "subpath", None) or "")
        quick = quicksettings.build(service, _current_title(service))  # the settings quicksettings_list names
        checkpoint, refresh, vae = quick.components["sd_model_checkpoint"], quick.refresh, quick.components["sd_vae"]
        checkpoint_request = extra_networks.checkpoint_request()  # a checkpoint card's click
        gr.HTML(_exposure_html(service), elem_id="easel_lan_warning", visible=bool(exposure_warnings(service.args)))
        notice = gr.HTML(_notice_html(service), elem_id="easel_notice")
        download_row = gr.Row(visible=False)
        with download_row:
            download = gr.Button(f"Download the default SD 1.5 checkpoint ({DEFAULT_MODEL_NAME}, about 4 GB)", elem_id="download_default_model")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                fields, t2i_results = txt2img.build(service, checkpoint, vae)
            with gr.Tab("img2img", id="img2img"):
                i2i_fields, i2i_results, i2i_images = img2img.build(service, checkpoint, vae)
            with gr.Tab("Extras", id="extras"):
                extras_image = extras.build(service)
            with gr.Tab("PNG Info", id="pnginfo"):
                pnginfo.build(service, fields, tabs, i2i_fields, i2i_images, extras_image, checkpoint)
            with gr.Tab("Checkpoint Merger", id="modelmerger"):
                checkpoint_merger.build(service, checkpoint)
            extension_parts.build_tabs(service)  # the Easel-native extensions' tabs (ControlNet's)
            extension_tabs.render(added_tabs)  # the A1111 extensions' tabs (on_ui_tabs), before Settings as in A1111
            with gr.Tab("Settings", id="settings"):
                settings = settings_tab.build(service, quick.components)
            with gr.Tab("Extensions", id="extensions"):
                extensions_refresh, extensions_outputs = extensions.build(service)

        send_to.wire(service, tabs, [t2i_results, i2i_results], i2i_fields, i2i_images, extras_image, checkpoint)
        page_scripts.wire_settings(service, demo)  # what ui/javascript/*.js reads (keyboard emphasis steps)

        def on_refresh():
            service.refresh_checkpoints()
            return (gr.update(choices=service.checkpoint_titles(), value=_current_title(service)),
                    gr.update(choices=service.vae_choices()), _notice_html(service),
                    model_parts.choices_update(service))

        refresh.click(on_refresh, outputs=[checkpoint, vae, notice, quick.modules], queue=False)
        model_parts.wire(service, quick.modules, notice)  # "VAE / Text Encoder": stored through the settings gate
        live.on_page_load(lambda: [model_parts.choices_update(service)], outputs=[quick.modules])

        # The quick settings and the Settings tab's fields for the same settings, with what that tab loaded.
        quick_outputs = [notice, checkpoint, vae, settings.components["sd_model_checkpoint"],
                         settings.components["sd_vae"], settings.loaded]

        def select_and_load(changes: dict, loaded: dict) -> list:
            """Save the choice, then load the model now (as A1111 does) so errors show here and the next job starts
            at once. Refused or not, the dropdowns then show the checkpoint and VAE that jobs use."""
            try:
                service.change_options(changes)
                message = _notice_html(service)
            except (UserError, BackendError) as exc:
                message = f'<div class="easel-error">{html.escape(exc.message)}</div>'
            title, vae_choice = _current_title(service), service.options["sd_vae"]
            loaded = dict(loaded, sd_model_checkpoint=title or "", sd_vae=vae_choice)
            return [message, gr.update(value=title), gr.update(value=vae_choice), gr.update(value=title),
                    gr.update(value=vae_choice), loaded]

        def on_checkpoint(title, loaded):
            return select_and_load({"sd_model_checkpoint": title}, loaded) if title else [gr.update()] * len(quick_outputs)

        # .input: only the user's choice saves and loads (not the page load's or Apply's refresh of the value)
        checkpoint.input(on_checkpoint, inputs=[checkpoint, settings.loaded], outputs=quick_outputs, show_progress="full")
        checkpoint_request.change(lambda request, loaded: on_checkpoint(extra_networks.requested_checkpoint(request), loaded),
                                  inputs=[checkpoint_request, settings.loaded], outputs=quick_outputs, show_progress="full")
        vae.input(lambda choice, loaded: select_and_load({"sd_vae": choice}, loaded), inputs=[vae, settings.loaded],
                  outputs=quick_outputs, show_progress="full")

        clip_skips = [fields["clip_skip"], i2i_fields["clip_skip"]]

        def on_page_load():
            """Every page load shows the server's state now (not the one at server start): the checkpoint and VAE
            jobs will use, Clip skip, the Settings tab's fields."""
            title = _current_title(service)
            clip_skip = service.options["CLIP_stop_at_last_layers"]
            return ([gr.update(choices=service.checkpoint_titles(), value=title),
                     gr.update(choices=service.vae_choices(), value=service.options["sd_vae"])]
                    + [gr.update(value=clip_skip) for _ in clip_skips] + settings.refreshed(service))

        # in the page's config as it is served, not as page-load events (ui/live_page.py says why)
        live.on_page_load(on_page_load, outputs=[checkpoint, vae] + clip_skips + settings.outputs())
        quicksettings.wire(quick, service, settings, notice)
        live.on_page_load(lambda: quick.on_page_load(service), outputs=quick.outputs())
        demo.load(extensions_refresh, outputs=extensions_outputs, queue=False)

        def on_load():
            offer = bool(service.no_checkpoint_message()) and not service.args.no_download_sd_model
            if offer and not network_available(DEFAULT_MODEL_URL):
                msg = service.no_checkpoint_message() + " No internet connection was found, so the default checkpoint cannot be downloaded now."
                return gr.update(visible=False), f'<div class="easel-error">{msg}</div>'
            return gr.update(visible=offer), _notice_html(service)

        demo.load(on_load, outputs=[download_row, notice])

        def on_download(progress=gr.Progress()):
            dest = service.paths.ckpt_dirs[0] / DEFAULT_MODEL_NAME
            try:
                download_file(DEFAULT_MODEL_URL, dest, lambda done, total: progress(done / total if total else 0, desc="Downloading"))
            except UserError as exc:
                return gr.update(), f'<div class="easel-error">{exc.message}</div>', gr.update()
            service.refresh_checkpoints()
            return (gr.update(choices=service.checkpoint_titles(), value=_current_title(service)),
                    _notice_html(service), gr.update(visible=False))

        download.click(on_download, outputs=[checkpoint, notice, download_row])
        # last, before Gradio makes the page config: ui-config.json's defaults and limits of the tabs' controls
        ui_config_file = service.paths.ui_config_file or service.paths.data_dir / "ui-config.json"
        ui_config.apply(demo, ui_config_file)
        ui_config.wire_defaults(demo, ui_config_file, *settings.defaults)  # the Settings tab's Defaults
    return demo


def _current_title(service: EaselService) -> str | None:
    try:
        return service.current_checkpoint().title
    except UserError:
        return None


def _exposure_html(service: EaselService) -> str:
    """The banner shown while others can reach this server without a login (--listen/--share without auth)."""
    return "".join(f'<div class="easel-error easel-lan-warning">\u26a0 {html.escape(w)}</div>'
                   for w in exposure_warnings(service.args))


def _notice_html(service: EaselService) -> str:
    msg = service.no_checkpoint_message()
    return f'<div class="easel-error">{msg}</div>' if msg else ""
