"""The lines of A1111's "Prompts from file or textbox" script: each non-empty line is one job, either a prompt or
command-line style options (`--prompt "a cat" --negative_prompt "..." --steps 10 --seed 5 --cfg_scale 7 ...`),
parsed as A1111 parses them (shlex; the words after --prompt/--negative_prompt up to the next option belong to it).

Torch-free: the app checks every line at the edge (an unknown option or a bad value is a 422 naming the line),
and the backend receives each line as the request fields it changes.
"""
from __future__ import annotations

import shlex
from typing import Any, Callable

from backend.core.errors import UserError


def _text(value: str) -> str:
    return value


def _whole(value: str) -> int:
    return int(value)


def _number(value: str) -> float:
    return float(value)


def _flag(value: str) -> bool:
    return value.lower() == "true"  # A1111: anything but "true" is false


# Option -> how its value is read (A1111's prompt_tags, less the output folders, which Easel does not let a
# request choose, and sd_model, which would need another checkpoint within the job).
OPTIONS: dict[str, Callable[[str], Any]] = {
    "prompt": _text, "negative_prompt": _text, "prompt_for_display": _text, "styles": _text,
    "seed": _whole, "subseed": _whole, "subseed_strength": _number,
    "seed_resize_from_h": _whole, "seed_resize_from_w": _whole,
    "sampler_index": _whole, "sampler_name": _text,
    "batch_size": _whole, "n_iter": _whole, "steps": _whole, "cfg_scale": _number,
    "width": _whole, "height": _whole,
    "restore_faces": _flag, "tiling": _flag, "do_not_save_samples": _flag, "do_not_save_grid": _flag,
}
REFUSED = {
    "outpath_samples": "Easel does not let a request choose its output folders",
    "outpath_grids": "Easel does not let a request choose its output folders",
    "sd_model": "Easel runs a job with one checkpoint; choose it in the checkpoint list",
}
MAX_LINES = 1000


def parse_line(line: str) -> dict[str, Any]:
    """One line's options, A1111's way; a line without "--" is a prompt."""
    if "--" not in line:
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ValueError(f"it cannot be split into options ({exc})") from None
    pos, found = 0, {}
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise ValueError(f'{word!r} must start with "--"')
        if pos + 1 >= len(words):
            raise ValueError(f"missing argument for command line option {word}")
        tag = word[2:]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            text = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                text += " " + words[pos]
                pos += 1
            found[tag] = text
            continue
        if tag in REFUSED:
            raise ValueError(f"--{tag} is not supported: {REFUSED[tag]}")
        reader = OPTIONS.get(tag)
        if reader is None:
            raise ValueError(f"unknown commandline option: {word} (known: "
                             f"{', '.join('--' + k for k in OPTIONS)})")
        try:
            found[tag] = reader(words[pos + 1])
        except ValueError:
            raise ValueError(f"{word} {words[pos + 1]!r} is not a valid value") from None
        pos += 2
    return found


def line_update(options: dict[str, Any], base_prompt: str, base_negative: str, position: str) -> dict[str, Any]:
    """The request fields one line changes (A1111: its options set on a copy of the job; a line's prompt goes
    before or after the job's prompt, or replaces an empty one)."""
    from backend.core import sampler_catalog

    update = {k: v for k, v in options.items() if k not in ("prompt_for_display", "sampler_index")}
    if "sampler_index" in options and "sampler_name" not in options:
        index = options["sampler_index"]
        if not 0 <= index < len(sampler_catalog.SAMPLERS):
            raise ValueError(f"--sampler_index {index} is out of range (0-{len(sampler_catalog.SAMPLERS) - 1})")
        update["sampler_name"] = sampler_catalog.SAMPLERS[index].name
    if "styles" in update:
        update["styles"] = [s.strip() for s in str(update["styles"]).split(",") if s.strip()]
    for key, base in (("prompt", base_prompt), ("negative_prompt", base_negative)):
        if update.get(key) and base:
            update[key] = f"{update[key]} {base}" if position == "start" else f"{base} {update[key]}"
    return update


def line_requests(req, values: dict) -> list[tuple[dict, Any]]:
    """[(fields the line changes, the job's request with them)] for each non-empty line of the script's text;
    a line that does not parse is a 422 naming it."""
    lines = [line.strip() for line in str(values["prompt_txt"]).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError("Prompts from file or textbox: the list of prompt inputs is empty; put one prompt (or "
                        "--prompt \"...\" options) per line.", status=422)
    if len(lines) > MAX_LINES:
        raise UserError(f"Prompts from file or textbox: {len(lines)} lines; at most {MAX_LINES} per job.", status=422)
    found = []
    for number, line in enumerate(lines, 1):
        try:
            update = line_update(parse_line(line), req.prompt, req.negative_prompt, values["prompt_position"])
        except ValueError as exc:
            raise UserError(f"Prompts from file or textbox: line {number} ({_short(line)}): {exc}.", status=422) \
                from None
        found.append((update, req.model_copy(update=update)))
    return found


def _short(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")
