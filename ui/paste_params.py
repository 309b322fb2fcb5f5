"""Parameters that travel: an infotext (a picture's, a pasted one, the last generation's) put back into a tab's
controls, as AUTOMATIC1111's paste fields do.

`field_updates` is the one place that maps infotext parameters onto controls; PNG Info's Send to buttons, the
results' Send to img2img / inpaint, and the paste button (read the parameters from the prompt box, or from the
last generation) all use it. Styles found at the end of the prompts are given back as the Styles selection (the
`infotext_styles` setting, as A1111); the checkpoint the infotext names becomes an "Override settings" entry of the
tab (`Checkpoint: name [hash]`; A1111 writes `Model hash: ...`), used for the tab's jobs until removed, and so do
the sampler noise settings it names (`RNG: NV`, `ENSD: 31337`, `Sigma churn: 0.5`, ...) where they differ from the
current ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from backend.core import infotext
from backend.core.errors import UserError
from backend.core.options import SETTINGS_BY_KEY, coerce
from backend.core.sampler_catalog import find_scheduler
from backend.service import EaselService
from ui.refiner import pasted_values

# fields a paste leaves alone, by tab: what describes the picture in img2img is the picture itself
NOT_PASTED = {"img2img": {"resize_mode", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res"}}
MODEL_HASH = "Model hash"
CHECKPOINT = "Checkpoint"  # the Override settings entry: "Checkpoint: <title>"
MODULES = "VAE / Text Encoder"  # the Override settings entry: "VAE / Text Encoder: ae.safetensors, clip_l.safetensors"


def parse(text: str) -> dict:
    return infotext.parse_infotext(text) if text and text.strip() else {}


def looks_like_infotext(text: str) -> bool:
    """A prompt box holding a pasted infotext (A1111's paste button reads it instead of the last generation)."""
    params = parse(text)
    return "Steps" in params or "Seed" in params


def checkpoint_of(service: EaselService, params: dict) -> str | None:
    """The title of the local checkpoint an infotext names (by name, else by its hash), or None."""
    model, model_hash = params.get("Model"), params.get(MODEL_HASH)
    if not model and not model_hash:
        return None
    query = f"{model} [{model_hash}]" if model and model_hash else str(model or model_hash)
    try:
        found = service.registry.find_checkpoint(query)
    except UserError:
        return None
    if found.sha256 is None and service.hashes.cached(found.path):  # hashed already (by the backend that loaded it)
        found = service.registry.with_hash(found)
    return found.title


def checkpoint_note(service: EaselService, params: dict) -> str:
    """One line for PNG Info: which local checkpoint made the picture, or that it is missing."""
    model, model_hash = params.get("Model"), params.get(MODEL_HASH)
    if not model and not model_hash:
        return ""
    found = checkpoint_of(service, params)
    named = " ".join(x for x in (str(model or ""), f"[{model_hash}]" if model_hash else "") if x)
    if found:
        return f"Checkpoint: {found} (used by Send to as an override setting)"
    return f"Checkpoint {named} is not in the checkpoint folders; Send to keeps the current checkpoint."


# Infotext entries that are settings, offered as "Override settings" entries when they differ from the current
# setting ("RNG: NV", "ENSD: 31337"), as A1111's infotext_to_setting_name_mapping.
SETTING_ENTRIES = {"ENSD": "eta_noise_seed_delta", "RNG": "randn_source", "Sigma churn": "s_churn",
                   "Sigma tmin": "s_tmin", "Sigma tmax": "s_tmax", "Sigma noise": "s_noise"}


def _setting_value(key: str, value: Any) -> Any:
    """An infotext value as the setting `key` holds it (UserError naming the entry when it cannot)."""
    setting = SETTINGS_BY_KEY[key]
    try:
        return coerce(setting, value)
    except UserError as exc:
        raise UserError(f"Override settings: {exc.message}", status=exc.status) from None


def modules_entry(service: EaselService, params: dict) -> str | None:
    """The Override settings entry for Forge's "Module 1: ae, Module 2: clip_l, ..." (the files of "VAE / Text
    Encoder" a FLUX.1 / SD3 picture was made with): "VAE / Text Encoder: ae.safetensors, clip_l.safetensors" when
    every file is here and the selection differs from the current one; None otherwise."""
    names = infotext.infotext_modules(params)
    if not names:
        return None
    try:
        paths = service.parts.resolve(names)
    except UserError:  # a file that is not here: the selection stays as it is
        return None
    if paths == list(service.options["forge_additional_modules"]):
        return None
    return f"{MODULES}: " + ", ".join(Path(p).name for p in paths)


def override_choices(service: EaselService, params: dict, current_checkpoint: str | None) -> list[str]:
    """The tab's "Override settings" entries for an infotext: its checkpoint when it is here and not the current one,
    and the sampler noise settings it names (RNG, ENSD, Sigma churn, ...) whose values differ from the current ones."""
    choices = []
    found = checkpoint_of(service, params)
    if found and found != current_checkpoint:
        choices.append(f"{CHECKPOINT}: {found}")
    modules = modules_entry(service, params)
    if modules:
        choices.append(modules)
    for name, key in SETTING_ENTRIES.items():
        if params.get(name) in (None, ""):
            continue
        try:
            value = _setting_value(key, params[name])
        except UserError:  # a value this version cannot hold: not offered
            continue
        if value != service.options[key]:
            choices.append(f"{name}: {params[name]}")
    return choices


def overrides_from(service: EaselService, choices: list[str] | None) -> dict:
    """override_settings for a job from the tab's "Override settings" entries ("Checkpoint: name [hash]", or A1111's
    "Model hash: abcdef1234"; "RNG: NV", "ENSD: 31337", ...)."""
    out: dict[str, Any] = {}
    for entry in choices or []:
        key, _, value = str(entry).partition(": ")
        if key in (CHECKPOINT, MODEL_HASH) and value.strip():
            try:
                out["sd_model_checkpoint"] = service.registry.find_checkpoint(value.strip()).title
            except UserError as exc:
                raise UserError(f"Override settings: {exc.message}", status=exc.status) from None
        elif key == MODULES:
            names = [n.strip() for n in value.split(", ") if n.strip()]
            try:
                out["forge_additional_modules"] = service.parts.resolve(names)
            except UserError as exc:
                raise UserError(f"Override settings: {exc.message}", status=exc.status) from None
        elif key in SETTING_ENTRIES and value.strip():
            out[SETTING_ENTRIES[key]] = _setting_value(SETTING_ENTRIES[key], value.strip())
    return out


def field_updates(service: EaselService, text: str, fields: dict, tab: str, *, keep_size: bool = False,
                  override: gr.components.Component | None = None,
                  current_checkpoint: str | None = None) -> dict:
    """{component: update} for the controls in `fields` (request-field name -> component) from an infotext.

    Controls the infotext says nothing about are left as they are. `keep_size`: width/height stay (a picture sent
    to img2img brings its own size). `override`: the tab's Override settings dropdown, given the checkpoint entry."""
    params = parse(text)
    if not params:
        return {}
    values = infotext.infotext_to_request_fields(params)
    values = pasted_values(service, values)  # the Refiner accordion and the hires. checkpoint
    mode = service.options["infotext_styles"]
    if mode != "Ignore" and "styles" in fields:
        found, prompt, negative = service.styles.extract(values.get("prompt", ""), values.get("negative_prompt", ""))
        if mode == "Discard":  # the styles' text dropped from the prompts, the selection left alone
            values.update(prompt=prompt, negative_prompt=negative)
        elif mode == "Apply" or found:
            values.update(prompt=prompt, negative_prompt=negative, styles=found)
    skip = NOT_PASTED.get(tab, set()) | ({"width", "height"} if keep_size else set())
    updates: dict = {}
    for name, component in fields.items():
        if name in skip or name not in values:
            continue
        value = values[name]
        if name == "clip_skip":
            value = int(value)
        elif name == "scheduler":
            try:
                value = find_scheduler(str(value)).label
            except UserError:  # a schedule this version does not know: the control stays as it is
                continue
        updates[component] = gr.update(value=value)
    if tab == "txt2img" and "enable_hr" in fields and "enable_hr" not in values:
        updates[fields["enable_hr"]] = gr.update(value=False)  # no hires. fields: a picture made without it
    if override is not None:
        choices = override_choices(service, params, current_checkpoint)
        updates[override] = gr.update(choices=choices, value=choices, visible=bool(choices))
    return updates


def last_infotext(texts: list | None) -> str:
    """The infotext of the tab's last generation (a grid's is its first picture's, as A1111 writes it)."""
    return next((t for t in texts or [] if t), "")


def paste_targets(fields: dict) -> tuple[dict, list]:
    """(the controls a paste fills: every field but the Override settings, the outputs of a paste event: those plus
    the tab's Override settings)."""
    targets = {name: comp for name, comp in fields.items() if name != "override_choices"}
    return targets, list(targets.values()) + ([fields["override_choices"]] if "override_choices" in fields else [])


def wire_paste_button(service: EaselService, tab: str, button: gr.Button, fields: dict, results: dict,
                      checkpoint: gr.components.Component) -> None:
    """The tab's paste button (A1111's ↙️): the parameters of an infotext pasted into the prompt box, or else of the
    tab's last generation, into the tab's controls."""
    targets, outputs = paste_targets(fields)

    def on_paste(prompt_text: str, texts: list, current: str | None):
        text = prompt_text if looks_like_infotext(prompt_text or "") else last_infotext(texts)
        if not text:
            gr.Warning("Nothing to read: paste an infotext into the prompt box, or generate first.")
            return {}
        return field_updates(service, text, targets, tab, override=fields["override_choices"],
                             current_checkpoint=current)

    button.click(on_paste, [fields["prompt"], results["infotexts"], checkpoint], outputs, queue=False)
