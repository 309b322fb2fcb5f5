"""The `infotext` request field (AUTOMATIC1111 1.7+): an infotext's parameters fill a txt2img/img2img request.

A1111's rule (`Api.apply_infotext`): the infotext is parsed as a pasted one; each request field the infotext has a
value for takes it unless the request gave that field itself (the fields a client sent, `model_fields_set`), and
the settings the infotext records (Clip skip, ENSD, RNG, ... and the checkpoint) join `override_settings` unless the
request overrides them itself. Only the fields a paste fills on that tab are filled: img2img takes no hires. fix
fields.

This module holds the torch-free part (which fields and which settings an infotext gives); `backend.service` adds
what needs the server (styles found at the end of the prompts, the checkpoint looked up by name or hash, each
setting passed through the settings gate).
"""
from __future__ import annotations

from typing import Any, Mapping

from backend.core.infotext import infotext_modules, infotext_to_request_fields

# Infotext key -> the setting it records (A1111's `infotext_to_setting_name_mapping`, less the checkpoint, which is
# looked up by the service). A setting Easel does not declare is left out.
INFOTEXT_SETTINGS: tuple[tuple[str, str], ...] = (
    ("Clip skip", "CLIP_stop_at_last_layers"),
    ("Conditional mask weight", "inpainting_mask_weight"),
    ("ENSD", "eta_noise_seed_delta"),
    ("Schedule max sigma", "sigma_max"),
    ("Schedule min sigma", "sigma_min"),
    ("Schedule rho", "rho"),
    ("Noise multiplier", "initial_noise_multiplier"),
    ("Eta", "eta_ancestral"),
    ("Eta DDIM", "eta_ddim"),
    ("Sigma churn", "s_churn"),
    ("Sigma tmin", "s_tmin"),
    ("Sigma tmax", "s_tmax"),
    ("Sigma noise", "s_noise"),
    ("Discard penultimate sigma", "always_discard_next_to_last_sigma"),
    ("UniPC variant", "uni_pc_variant"),
    ("UniPC skip type", "uni_pc_skip_type"),
    ("UniPC order", "uni_pc_order"),
    ("UniPC lower order final", "uni_pc_lower_order_final"),
    ("Token merging ratio", "token_merging_ratio"),
    ("Token merging ratio hr", "token_merging_ratio_hr"),
    ("RNG", "randn_source"),
    ("NGMS", "s_min_uncond"),
    ("SLG scale", "sd3_slg_scale"),
    ("SLG layers", "sd3_slg_layers"),
    ("SLG start", "sd3_slg_start"),
    ("SLG end", "sd3_slg_end"),
    ("Pad conds", "pad_cond_uncond"),
    ("VAE Encoder", "sd_vae_encode_method"),
    ("VAE Decoder", "sd_vae_decode_method"),
    ("Emphasis", "emphasis"),
)

# What a paste fills on the img2img tab does not include hires. fix (A1111's img2img paste fields).
_TXT2IMG_ONLY = ("enable_hr", "hr_")


def request_fields(params: Mapping[str, object], request_type: type, *, img2img: bool) -> dict[str, Any]:
    """The request fields (of `request_type`, a pydantic request model) that parsed infotext `params` give values
    for, as a paste fills them. The checkpoint and the settings are not among them (`infotext_settings`)."""
    values = infotext_to_request_fields(params)
    fields = request_type.model_fields
    out = {}
    for name, value in values.items():
        if name not in fields or name == "override_settings":
            continue
        if img2img and name.startswith(_TXT2IMG_ONLY):
            continue
        out[name] = value
    return out


def infotext_settings(params: Mapping[str, object]) -> dict[str, object]:
    """{setting key: the infotext's value, as written} for each setting the infotext records; Forge's "Module 1: ae,
    Module 2: clip_l, ..." give `forge_additional_modules` (the names, resolved by the settings gate)."""
    out = {setting: params[key] for key, setting in INFOTEXT_SETTINGS if params.get(key) not in (None, "")}
    modules = infotext_modules(params)
    if modules:
        out["forge_additional_modules"] = modules
    return out


def checkpoint_query(params: Mapping[str, object]) -> str | None:
    """How to look up the infotext's checkpoint: "name [hash]", the name or the hash alone; None without one."""
    model, model_hash = params.get("Model"), params.get("Model hash")
    if model and model_hash:
        return f"{model} [{model_hash}]"
    return str(model or model_hash) if model or model_hash else None


def unset_fields(req, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values for the fields the request did not give itself (A1111: the request's own value wins)."""
    given = req.model_fields_set
    return {name: value for name, value in values.items() if name not in given}
