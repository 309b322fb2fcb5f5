"""The tabs extensions add to the web UI (A1111's `script_callbacks.on_ui_tabs`): their callbacks are called while
the UI is built, before the page's own Blocks opens (each makes its own `gr.Blocks`), and each tab is rendered
after the built-in generation tabs, as A1111 places them (before Settings and Extensions)."""
from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("easel")


def collect(service) -> list[tuple]:
    """[(gr.Blocks, title, elem_id)] from the extensions' on_ui_tabs callbacks (one that raises: logged, skipped)."""
    return service.extension_scripts.ui_tabs(service.options)


def render(tabs: list[tuple]) -> None:
    """Each extension's Blocks in a tab of its own; one that cannot be rendered is logged and left out."""
    for blocks, title, elem_id in tabs:
        if not isinstance(blocks, gr.Blocks):
            log.error("on_ui_tabs: the tab %r is a %s, not a gr.Blocks; skipped", title, type(blocks).__name__)
            continue
        try:
            with gr.Tab(title, id=elem_id or title, elem_id=f"tab_{elem_id}" if elem_id else None):
                blocks.render()
        except Exception:  # noqa: BLE001  an extension's broken tab never stops the UI
            log.exception("on_ui_tabs: the tab %r could not be rendered; skipped", title)
