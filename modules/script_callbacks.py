"""AUTOMATIC1111's `modules.script_callbacks`: a script file registers callbacks when it is imported; they go into
that file's `CallbackRegistry` (`modules.script_loading` sets it while the file loads), never into a global list.

Wired: `on_cfg_denoiser` (each model call of a job that uses the script file, as a sampling hook's `unet_inputs`:
the callback may change `params.x` and `params.text_cond`). Not wired yet, and refused at registration with an
error naming them, so a script needing one is skipped with that message rather than silently doing nothing:
`on_ui_tabs`, `on_ui_settings`, `on_app_started`, `on_before_image_saved`, `on_image_saved`, `on_model_loaded`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from modules.context import missing

__all__ = ["CFGDenoiserParams", "CallbackRegistry", "on_cfg_denoiser", "on_ui_tabs", "on_ui_settings",
           "on_app_started", "on_before_image_saved", "on_image_saved", "on_model_loaded"]


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
class CallbackRegistry:
    """The callbacks one script file registered."""

    cfg_denoiser: list[Callable] = field(default_factory=list)


def on_cfg_denoiser(callback: Callable, *, name: str | None = None) -> None:
    from modules.script_loading import loading_registry
    loading_registry("on_cfg_denoiser").cfg_denoiser.append(callback)


def _not_wired(what: str):
    def register(callback: Callable = None, *, name: str | None = None) -> None:
        raise NotImplementedError(f"modules.script_callbacks.{what} is not supported by Easel's AUTOMATIC1111 "
                                  f"compatibility layer yet (supported: on_cfg_denoiser).")
    register.__name__ = what
    return register


on_ui_tabs = _not_wired("on_ui_tabs")
on_ui_settings = _not_wired("on_ui_settings")
on_app_started = _not_wired("on_app_started")
on_before_image_saved = _not_wired("on_before_image_saved")
on_image_saved = _not_wired("on_image_saved")
on_model_loaded = _not_wired("on_model_loaded")


def __getattr__(name: str):
    raise missing(__name__, name)
