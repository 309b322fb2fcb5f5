"""The context an A1111 script's code runs in: set by the process that calls the script (the app for `title`,
`show` and `ui`; the backend for `run`, `process`, `postprocess_image`, ...) for the duration of the call, read by
`modules.shared`, `modules.processing` and `modules.images`. A `ContextVar`, so nothing is shared between jobs
and no engine state is global.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass
class ScriptState:
    """What A1111's `shared.state` holds that a script may set (`job_count`, `job`, `textinfo`, ...)."""

    job: str = ""
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    textinfo: str | None = None


@dataclass
class ScriptContext:
    """options: the settings (the job's, in the backend) by A1111 key. process_images(p) -> Processed: the ordinary
    pipeline in the running job (None outside a job). interrupted/skipped: the job's flags. save_image: Easel's
    saving for `modules.images.save_image` (None outside a job). cmd_opts: the command-line flags. add_option:
    registers an extension's setting (only while the app runs the on_ui_settings callbacks)."""

    options: Mapping[str, Any]
    cmd_opts: Any = None
    process_images: Callable[[Any], Any] | None = None
    interrupted: Callable[[], bool] = lambda: False
    skipped: Callable[[], bool] = lambda: False
    save_image: Callable[..., Any] | None = None
    state: ScriptState = field(default_factory=ScriptState)
    # `shared.opts.add_option(key, info)` in an on_ui_settings callback (the app, at start-up); None elsewhere
    add_option: Callable[[str, Any], None] | None = None
    # `shared.state.interrupt()` / `skip()`: stop the running job, skip its current batch (None outside a job)
    interrupt: Callable[[], None] | None = None
    skip: Callable[[], None] | None = None
    # `shared.sd_model`, `p.sd_model`: A1111's description of the job's model (`sd_checkpoint_info`, `is_sdxl`,
    # ...; None outside a job); `modules.devices`: the job's device and dtypes (None outside a job)
    model: Callable[[], Any] | None = None
    device: Any = None
    dtype: Any = None
    dtype_vae: Any = None
    # `modules.sd_models`: the checkpoints on disk as A1111's CheckpointInfo (the app process), the selected one
    checkpoints: Callable[[], list] | None = None
    selected_checkpoint: Callable[[], Any] | None = None
    where: str = "a script"  # names the script in error messages


_current: ContextVar[ScriptContext | None] = ContextVar("a1111_script_context", default=None)
# The app process's context for extension code that runs outside a call Easel makes (a route on_app_started added,
# an event handler of an on_ui_tabs tab): set once by the app (`EaselService`), it reads the live settings. The
# backend sets none: there a script's code runs only inside the job's calls.
_app_default: ScriptContext | None = None


def set_app_default(context: ScriptContext | None) -> None:
    global _app_default
    _app_default = context


@contextlib.contextmanager
def running(context: ScriptContext):
    """Make `context` the one the layer reads while the block runs (a script's call)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def peek() -> ScriptContext | None:
    """The running script's context (or the app's default), None outside one."""
    return _current.get() or _app_default


def current(what: str) -> ScriptContext:
    """The running script's context; `what` names the layer's name used outside one."""
    context = _current.get() or _app_default
    if context is None:
        raise RuntimeError(f"{what} is only available while Easel runs an AUTOMATIC1111 script "
                           "(its title/show/ui in the app, run/process/postprocess_image in a job).")
    return context


def missing(where: str, name: str) -> AttributeError:
    """The error for a name the layer does not provide (`where`: the module or object, e.g. `modules.shared`)."""
    import sys

    names = vars(sys.modules[where]) if where in sys.modules else {}  # not getattr: modules' __getattr__ ends here
    provided = names.get("PROVIDED") or names.get("__all__")  # PROVIDED: with the names read when asked for
    return AttributeError(f"{where}.{name} is not available in Easel's AUTOMATIC1111 compatibility layer"
                          + (f" (it provides: {', '.join(provided)})." if provided else "."))
