"""The 16-channel VAE of FLUX.1 and Stable Diffusion 3 / 3.5, read from its tensors.

Both families use an AutoencoderKL with the SD VAE's architecture but 16 latent channels and no
`quant_conv` / `post_quant_conv`; they differ only in how latents are normalised
(latents = (VAE mean - shift) * scale):

- FLUX.1 (`ae.safetensors`): scale 0.3611, shift 0.1159
- SD 3 / 3.5 (`first_stage_model.*` inside the checkpoint, or the separate VAE): scale 1.5305, shift 0.0609

The files come in the LDM key layout (`encoder.down.N.block.M.*`, `decoder.up.*`, with a
`first_stage_model.` or `vae.` prefix inside all-in-one checkpoints) or the diffusers layout
(`encoder.down_blocks.*`). The config is read from the shapes by `model_detection.detect_vae`, the
names converted by `ldm_convert`, and the module built empty and assigned, as for SD checkpoints.
"""
from __future__ import annotations

import logging
import re

import torch

from backend.core.errors import UserError
from backend.engine.ldm_convert import convert_vae_diffusers_to_ldm, convert_vae_ldm_to_diffusers
from backend.engine.model_detection import detect_vae
from backend.engine.model_loader import (_modernize_diffusers_vae, build_vae, build_without_weights, few_names,
                                        load_weights)

log = logging.getLogger(__name__)

FLOW_LATENT_CHANNELS = 16
# family -> (scaling_factor, shift_factor) of its latents
FLOW_VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
_FAMILY_LABELS = {"flux": "FLUX.1", "sd3": "Stable Diffusion 3"}
VAE_PREFIXES = ("first_stage_model.", "vae.")


def _strip_vae_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own names: a checkpoint's `first_stage_model.` / `vae.` prefix removed (keys without it dropped)."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _ldm_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE tensors in the LDM layout (`encoder.down.*`), converting a diffusers-layout VAE."""
    sd = _strip_vae_prefix(sd)
    if any(k.startswith("encoder.down.") for k in sd):
        return sd
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        levels = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m}
        try:
            return convert_vae_diffusers_to_ldm(_modernize_diffusers_vae(sd), max(levels) + 1)
        except KeyError as e:
            raise UserError(f"The VAE has a tensor Easel does not recognize: {e.args[0]}") from None
    raise UserError("The file holds no VAE Easel recognizes (expected encoder.down.* or encoder.down_blocks.* keys).")


def vae_config_from_tensors(sd: dict[str, torch.Tensor], *, family: str | None = None) -> dict:
    """`AutoencoderKL` kwargs for a FLUX/SD3 VAE, read from its tensors (LDM or diffusers layout, prefixed or not).

    With `family` ("flux" | "sd3") the config carries that family's `scaling_factor` and `shift_factor`.
    A VAE without 16 latent channels (an SD 1.x/2.x/SDXL VAE) is refused with a message."""
    config = detect_vae(_ldm_names(sd), "")
    latent = int(config["latent_channels"])
    if latent != FLOW_LATENT_CHANNELS:
        what = _FAMILY_LABELS.get(family or "", "FLUX.1 and Stable Diffusion 3")
        kind = "an SD 1.x/2.x/SDXL VAE" if latent == 4 else "an unknown VAE"
        raise UserError(f"This VAE has {latent} latent channels ({kind}); "
                        f"{what} needs a VAE with {FLOW_LATENT_CHANNELS} latent channels.")
    if family is not None:
        if family not in FLOW_VAE_FACTORS:
            raise ValueError(f"unknown flow family {family!r}")
        scale, shift = FLOW_VAE_FACTORS[family]
        config["scaling_factor"], config["shift_factor"] = scale, shift
    return config


def flow_vae_to_diffusers(sd: dict[str, torch.Tensor], *,
                          family: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(AutoencoderKL kwargs as `vae_config_from_tensors` gives them, the state dict in diffusers names)."""
    ldm = _ldm_names(sd)
    config = vae_config_from_tensors(ldm, family=family)
    out, unknown = convert_vae_ldm_to_diffusers(ldm, len(config["block_out_channels"]))
    if unknown:
        log.warning("VAE: ignoring %d unrecognized tensors: %s", len(unknown), few_names(unknown))
    return config, out


def load_flow_vae(sd: dict[str, torch.Tensor], *, family: str, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """A `diffusers.AutoencoderKL` for `family` ("flux" | "sd3") from its tensors, built empty and assigned.

    `config.scaling_factor` / `config.shift_factor` hold the family's latent normalisation."""
    if family not in FLOW_VAE_FACTORS:
        raise ValueError(f"unknown flow family {family!r}")
    config, weights = flow_vae_to_diffusers(sd, family=family)
    vae = build_without_weights(build_vae, config)
    load_weights(vae, weights, f"{_FAMILY_LABELS[family]} VAE", dtype=dtype, device=device)
    return vae
