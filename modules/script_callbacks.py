"""AUTOMATIC1111's `modules.script_callbacks`: a script file registers callbacks when it is imported; they go into
that file's `CallbackRegistry` (`modules.script_loading` sets it while the file loads), never into a global list.
The process that loaded the file owns its registry and calls the callbacks (`call_each`):

- app process (`backend/a1111_scripts.py`): `on_ui_settings` (at start-up, before the settings are used: the options
  a callback adds with `shared.opts.add_option` join the settings table), `on_ui_tabs` (while the web UI is built:
  the tabs follow the built-in ones), `on_app_started(demo, app)` (once the FastAPI app and the Gradio blocks exist);
- backend process (`backend/engine/a1111_callbacks.py`, for every generation job while the extension is enabled,
  as A1111): `on_cfg_denoiser` (each model call: `params.x`, `params.text_cond`, `params.text_uncond` may be
  changed), `on_before_image_saved` / `on_image_saved` (`ImageSaveParams` around each saved picture: a change to
  `params.image` or `params.pnginfo["parameters"]` is what is written), `on_model_loaded` (a checkpoint loaded).

A callback that raises is logged with its extension's name and skipped, as A1111 does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules.context import missing

__all__ = ["CFGDenoiserParams", "ImageSaveParams", "CallbackRegistry", "on_cfg_denoiser", "on_ui_tabs",
           "on_ui_settings", "on_app_started", "on_before_image_saved", "on_image_saved", "on_model_loaded"]

log = logging.getLogger("easel")


@dataclass
class CFGDenoiserParams:
    """`on_cfg_denoiser(params)`: `x` the (scaled) latent input of the model call, `sigma`, `sampling_step`,
    `total_sampling_steps`, `text_cond` / `text_uncond` the text features of the conditional / unconditional rows
    (one tensor `text_cond` for all rows when CFG is off: `text_uncond` is None). Changing `x` or `text_cond`
    changes the call."""

    x: Any
    image_cond: Any
    sigma: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any
    text_uncond: Any
    denoiser: Any = None


@dataclass
class ImageSaveParams:
    """`on_before_image_saved(params)` / `on_image_saved(params)`: `image` (PIL), `p` (A1111's processing object of
    the job, or None), `filename` (the file's path), `pnginfo` ({"parameters": infotext, ...}: the PNG text chunks
    written; a before-callback may change them and the image)."""

    image: Any
    p: Any
    filename: str
    pnginfo: dict


@dataclass
class CallbackRegistry:
    """The callbacks one script file registered, by A1111's callback name (without `on_`)."""

    cfg_denoiser: list[Callable] = field(default_factory=list)
    ui_tabs: list[Callable] = field(default_factory=list)
    ui_settings: list[Callable] = field(default_factory=list)
    app_started: list[Callable] = field(default_factory=list)
    before_image_saved: list[Callable] = field(default_factory=list)
    image_saved: list[Callable] = field(default_factory=list)
    model_loaded: list[Callable] = field(default_factory=list)

    BACKEND = ("cfg_denoiser", "before_image_saved", "image_saved", "model_loaded")  # run in the jobs

    def any_backend(self) -> bool:
        return any(getattr(self, name) for name in self.BACKEND)


def call_each(callbacks: list[Callable], args: tuple, where: str) -> list:
    """Call each callback with `args`; one that raises is logged with `where` (the extension and file) and
    skipped, as A1111 does. -> the results of those that returned."""
    results = []
    for callback in callbacks:
        try:
            results.append(callback(*args))
        except Exception:  # noqa: BLE001  an extension's bug never stops the UI or the job
            log.exception("%s: callback %s failed and was skipped", where, getattr(callback, "__name__", callback))
    return results


def _register(what: str):
    def register(callback: Callable, *, name: str | None = None) -> None:
        from modules.script_loading import loading_registry
        if not callable(callback):
            raise TypeError(f"modules.script_callbacks.on_{what} needs a function, got {callback!r}")
        getattr(loading_registry(f"on_{what}"), what).append(callback)
    register.__name__ = f"on_{what}"
    return register


on_cfg_denoiser = _register("cfg_denoiser")
on_ui_tabs = _register("ui_tabs")
on_ui_settings = _register("ui_settings")
on_app_started = _register("app_started")
on_before_image_saved = _register("before_image_saved")
on_image_saved = _register("image_saved")
on_model_loaded = _register("model_loaded")


def __getattr__(name: str):
    raise missing(__name__, name)


@dataclass
class FileCallbacks:
    """The callbacks one loaded script file registered, with where they come from (named in the log when one
    raises); the app process and the backend process each keep a list of them."""

    path: Path
    extension: str
    registry: CallbackRegistry

    @property
    def where(self) -> str:
        return f"extension {self.extension} ({self.path.name})"
