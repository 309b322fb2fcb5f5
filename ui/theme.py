"""`--theme light|dark`: the web UI's colour scheme chosen by the server, as AUTOMATIC1111 does it.

Gradio picks light or dark from the page address's `__theme` parameter, else from the browser's preference. With
--theme, a page opened without that parameter reloads itself once with `?__theme=<theme>` added; an address that
already names a theme (a bookmark, Gradio's own setting) is left alone.
"""
from __future__ import annotations

import json

THEMES = ("light", "dark")


def theme_head(theme: str | None) -> str:
    """The <head> script that applies `theme` ("" when no theme was asked for)."""
    if theme is None:
        return ""
    if theme not in THEMES:
        raise ValueError(f"theme must be one of {THEMES}, got {theme!r}")
    return ("<script>(() => {"
            " const url = new URL(window.location.href);"
            " if (!url.searchParams.has('__theme')) {"
            f" url.searchParams.set('__theme', {json.dumps(theme)}); window.location.replace(url.href); }}"
            " })();</script>")
