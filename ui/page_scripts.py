"""Easel's own scripts in the page (`ui/javascript/*.js`: the keyboard habits, generate forever,
the prompt box the extra-network cards write to), and the settings
they read.

The scripts go into the page's <head> inline (`head()`); the settings they need reach them as `window.easelOpts`
when the page loads, read from the options at that moment, so a changed setting applies at the next page load.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend.service import EaselService

SCRIPTS_DIR = Path(__file__).resolve().parent / "javascript"
# The settings the page scripts read (backend.core.options; the keyboard's emphasis steps and word delimiters).
PAGE_SETTINGS = ("keyedit_precision_attention", "keyedit_precision_extra", "keyedit_delimiters")


def head() -> str:
    """<script> tags with the page scripts, in file-name order."""
    return "\n".join(f'<script type="text/javascript">\n{path.read_text(encoding="utf-8")}\n</script>'
                     for path in sorted(SCRIPTS_DIR.glob("*.js")))


def wire_settings(service: EaselService, demo: gr.Blocks) -> None:
    """At each page load: the current values of `PAGE_SETTINGS` into `window.easelOpts`."""
    holder = gr.JSON(visible="hidden", elem_id="easel_page_settings")
    demo.load(lambda: {key: service.options[key] for key in PAGE_SETTINGS}, None, holder, queue=False).then(
        None, holder, None, js="(opts) => { window.easelOpts = Object.assign(window.easelOpts || {}, opts); }")
