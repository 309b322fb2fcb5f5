"""What Easel accepts but does not act on, in one place, and the warnings that name it.

AUTOMATIC1111's clients and start-up scripts send flags and request fields that Easel has no use for (yet).
They are accepted, so those scripts keep working, but never silently dropped:

- a command-line flag listed in `IGNORED_FLAGS` and given is named in a warning that `app.py` logs at start
  (`flag_warnings`);
- a request field listed in `IGNORED_FIELDS` and set to something other than its default is named in a warning
  that the service adds to the job's warnings, so it reaches `info["warnings"]` in the API's answer and the info
  area under the images in the UI (`request_warnings`).

When a feature is implemented, its entry leaves these tables. Standard library only (no torch, no pydantic
import needed): the app process and the launcher may import it.
"""
from __future__ import annotations

from typing import Any, Callable

# Flag (argparse dest) -> why it has no effect. Warned about when its value differs from the parser's default.
IGNORED_FLAGS: dict[str, str] = {
    "lowram": "checkpoint weights are always read into RAM before they are moved to the GPU",
    "upcast_sampling": "sampling is not upcast separately; use --no-half (or --precision full) for float32",
    "skip_load_model_at_start": "Easel loads the checkpoint when the first job needs it, never at start",
    "skip_torch_cuda_test": "Easel's launcher runs no CUDA test (without a usable GPU Easel runs on the CPU)",
    "skip_version_check": "Easel's launcher checks no package versions beyond installing its pinned requirements",
    "reinstall_torch": "Easel's launcher reinstalls nothing; remove the venv folder to start over",
    "do_not_download_clip": "Easel never downloads CLIP: its tokenizer is built offline and the text encoders "
                            "come with the checkpoint",
}


def _unset(*defaults: Any) -> Callable[[Any], bool]:
    """A test for "left at its default": None, empty, or one of `defaults`."""
    return lambda value: value is None or value in ("", [], {}) or any(value == d for d in defaults)


# Request field -> (is it left at its default?, why it is ignored). Img2img-only fields are checked only on
# img2img requests (the txt2img request has no such field).
IGNORED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "comments": (_unset(), "comments are not used (AUTOMATIC1111 discards them too)"),
    "firstphase_width": (_unset(0), "the pre-1.0 hires. fix size is not used; use hr_scale or hr_resize_x/y"),
    "firstphase_height": (_unset(0), "the pre-1.0 hires. fix size is not used; use hr_scale or hr_resize_x/y"),
    "sampler_index_legacy": (_unset(), "a sampler is chosen by sampler_name (or sampler_index)"),
    "image_cfg_scale": (_unset(), "it is used only by instruct-pix2pix checkpoints, which Easel does not support"),
    "latent_mask": (_unset(), "a separate latent mask is not implemented; the mask is used"),
}


# The always-on scripts of Easel's built-in extensions (key, compared without case) -> whether txt2img runs it too
# (any other key is a 422: backend.core.scripts_catalog.check_alwayson_names, as A1111 answers). A running server
# checks against what its enabled extensions registered (extensions-builtin/*/easel_extension.py); this is the
# list when all are enabled.
ALWAYSON_SCRIPTS: dict[str, bool] = {"controlnet": True, "soft inpainting": False}


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def flag_warnings(args: Any) -> list[str]:
    """One warning per flag in `IGNORED_FLAGS` that `args` (parsed by `backend.core.cmd_args.parse_args`) has set."""
    from backend.core.cmd_args import build_parser

    parser = build_parser()
    warnings = []
    for dest, why in IGNORED_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and value != parser.get_default(dest):
            warnings.append(f"{flag_name(dest)} is accepted for AUTOMATIC1111 compatibility but has no effect: {why}.")
    return warnings


def request_warnings(req: Any) -> list[str]:
    """One warning per field in `IGNORED_FIELDS` that the request (`Txt2ImgRequest` or `Img2ImgRequest`) sets to
    something other than its default."""
    fields = type(req).model_fields
    warnings = []
    for name, (is_default, why) in IGNORED_FIELDS.items():
        if name in fields and not is_default(getattr(req, name)):
            warnings.append(f"{name} is accepted for AUTOMATIC1111 compatibility but ignored: {why}.")
    return warnings
