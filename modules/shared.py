"""AUTOMATIC1111's `modules.shared`: `opts` (the settings by A1111 key: the job's in a job, the app's in `ui()`),
`state` (the job's interrupt and skip flags, `interrupt()`, `skip()`, `job_count` and friends), `cmd_opts` (the
command-line flags) and, while a job runs the script, `sd_model` (A1111's description of the job's checkpoint:
`sd_checkpoint_info`, `is_sdxl`, `is_sd1`, `is_sd2`, ...), read from the running script's context
(`modules.context`)."""
from __future__ import annotations

from modules.context import current, missing, peek

__all__ = ["opts", "state", "cmd_opts", "OptionInfo"]
PROVIDED = (*__all__, "sd_model")  # sd_model: while a job runs the script (module __getattr__)


class OptionInfo:
    """An extension's setting, as `on_ui_settings` callbacks give it to `opts.add_option(key, info)`: its default,
    label, Gradio component (gr.Slider, gr.Checkbox, gr.Dropdown, gr.Radio, gr.Textbox, gr.Number) and that
    component's arguments (`{"minimum": .., "maximum": .., "step": ..}`, `{"choices": [...]}`, or a function
    returning them), `section=(id, title)` (the Settings tab's section)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh
        self.comment_before, self.comment_after = comment_before, comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api
        self.category_id = category_id

    def info(self, info):
        self.comment_after += f" ({info})"
        return self

    def html(self, html):
        self.comment_after += html
        return self

    def needs_restart(self):
        return self

    def needs_reload_ui(self):
        return self


class _Options:
    """`opts.KEY` reads setting KEY; `opts.data` is all of them."""

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        options = current("modules.shared.opts").options
        if key == "data":
            return {k: options[k] for k in options}
        try:
            return options[key]
        except KeyError:
            raise AttributeError(f"modules.shared.opts.{key}: Easel has no setting {key!r}.") from None

    def __setattr__(self, key: str, value):
        raise AttributeError(f"modules.shared.opts.{key}: a script cannot change Easel's settings (use the "
                             "request's override_settings or the Settings tab).")

    def add_option(self, key: str, info: OptionInfo) -> None:
        """In an `on_ui_settings` callback: add the extension's setting `key` (see `OptionInfo`)."""
        add = current("modules.shared.opts.add_option").add_option
        if add is None:
            raise RuntimeError("modules.shared.opts.add_option can only be called in an on_ui_settings callback.")
        add(key, info)

    def get(self, key: str, default=None):
        options = current("modules.shared.opts").options
        return options[key] if key in options else default


class _State:
    """`state.interrupted` / `state.skipped`: the job's flags (`state.interrupt()` / `state.skip()` set them, as
    the Interrupt and Skip buttons); `job_count`, `job_no`, `job`, `textinfo`,
    `sampling_step(s)`: the script's own bookkeeping (Easel's progress bar follows the pipeline's steps)."""

    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        context = current("modules.shared.state")
        if key == "interrupted":
            return context.interrupted()
        if key == "skipped":
            return context.skipped()
        if key in ("interrupt", "skip"):  # A1111: Interrupt / Skip from a script, on the running job
            action = getattr(context, key)
            if action is None:
                raise RuntimeError(f"modules.shared.state.{key}() can only be called while a job runs the script.")
            return action
        if hasattr(context.state, key):
            return getattr(context.state, key)
        raise missing("modules.shared.state", key)

    def __setattr__(self, key: str, value):
        context = current("modules.shared.state")
        if not hasattr(context.state, key):
            raise missing("modules.shared.state", key)
        setattr(context.state, key, value)


class _CmdOpts:
    def __getattr__(self, key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        flags = current("modules.shared.cmd_opts").cmd_opts
        if flags is None or not hasattr(flags, key):
            raise missing("modules.shared.cmd_opts", key)
        return getattr(flags, key)


opts = _Options()
state = _State()
cmd_opts = _CmdOpts()


def job_model(what: str):
    """A1111's `sd_model` of the running job (`what` names the attribute asked for)."""
    context = peek()
    if context is None or context.model is None:
        raise AttributeError(f"{what} is not available outside a job: Easel's app process holds no model (while a "
                             "job runs the script it describes the job's checkpoint: sd_checkpoint_info, is_sdxl, "
                             "is_sd1, is_sd2, sd_model_hash).")
    return context.model()


def __getattr__(name: str):
    if name == "sd_model":
        return job_model("modules.shared.sd_model")
    raise missing(__name__, name)
