"""The app side of the `infotext` request field: fill a request from its infotext, as AUTOMATIC1111 1.7+ does.

`backend.core.infotext_request` says which fields and settings an infotext gives; here the server's parts join:
the styles found at the end of the infotext's prompts (the `infotext_styles` setting, as a paste in the UI), the
checkpoint looked up by name or hash in the checkpoint folders, and each setting passed through the settings gate.
What cannot be used (a checkpoint that is not here, a setting value the gate refuses) is left out and named in the
job's warnings, never a failed request: the request's own fields are what the client asked for.
"""
from __future__ import annotations

from typing import Any

from backend.core import infotext_request
from backend.core.errors import UserError
from backend.core.infotext import parse_infotext
from backend.core.schemas import Img2ImgRequest


# The parameters line is read with A1111's pattern, whose time grows with the square of a line's length when the
# line holds no "key: value" pairs (40,000 characters: about a minute). Real ones are a few thousand characters.
MAX_PARAMS_LINE = 8000


def apply_infotext(service: Any, req):
    """-> (`req` with the fields and override settings its `infotext` gives, the warnings). `service`: the
    `EaselService` (its options, styles and checkpoint registry). A request without an infotext comes back as is."""
    text = req.infotext
    if not text or not text.strip():
        return req, []
    last_line = text.replace("\r", "\n").strip().rsplit("\n", 1)[-1]
    if len(last_line) > MAX_PARAMS_LINE:
        raise UserError(f"infotext: its last line (the parameters) is {len(last_line)} characters long; the limit is "
                        f"{MAX_PARAMS_LINE}.", status=413)
    params = parse_infotext(text)
    img2img = isinstance(req, Img2ImgRequest)
    values = infotext_request.request_fields(params, type(req), img2img=img2img)
    _apply_styles(service, values)
    update = infotext_request.unset_fields(req, values)

    warnings: list[str] = []
    overrides = dict(req.override_settings or {})
    settings = {key: value for key, value in infotext_request.infotext_settings(params).items()
                if service.options.setting(key) is not None and key not in overrides}
    query = infotext_request.checkpoint_query(params)
    if query and "sd_model_checkpoint" not in overrides and not service.options.get("disable_weights_auto_swap"):
        try:
            settings["sd_model_checkpoint"] = service.registry.find_checkpoint(query).title
        except UserError:
            warnings.append(f"infotext: the checkpoint {query} is not in the checkpoint folders; the job uses the "
                            "current checkpoint.")
    for key, value in settings.items():
        try:
            checked = service.options.check({key: value}, per_job=True)
        except UserError as exc:
            warnings.append(f"infotext: {key} = {value!r} was not applied: {exc.message}")
            continue
        if key in checked and checked[key] != service.options.get(key):  # A1111: only what differs from now
            overrides[key] = checked[key]
    if overrides != (req.override_settings or {}):
        update["override_settings"] = overrides
    return (req.model_copy(update=update) if update else req), warnings


def _apply_styles(service: Any, values: dict) -> None:
    """Styles whose text ends the infotext's prompts become the request's styles (`infotext_styles`, as a paste)."""
    mode = service.options["infotext_styles"]
    if mode == "Ignore" or ("prompt" not in values and "negative_prompt" not in values):
        return
    found, prompt, negative = service.styles.extract(values.get("prompt", ""), values.get("negative_prompt", ""))
    if mode != "Discard" and not (mode == "Apply" or found):
        return
    for key, text in (("prompt", prompt), ("negative_prompt", negative)):
        if key in values:  # the styles' text taken off the prompts
            values[key] = text
    if mode != "Discard":
        values["styles"] = found
