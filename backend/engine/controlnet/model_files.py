"""ControlNet model files loaded into diffusers: key conversion between the original and diffusers layouts.

Finding the files and reading their architecture is `backend.controlnet.model_files` (torch-free); this
converts the original single-file layout's keys to diffusers' `ControlNetModel` names (and back, for
tests and conversion tools) and builds the model on the CPU.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from backend.controlnet.model_files import LDM_PREFIX, ControlNetInfo, detect_controlnet
from backend.core.errors import UserError
from backend.engine.ldm_convert import UNetLayout, unet_key_to_diffusers, unet_key_to_ldm

log = logging.getLogger(__name__)


# -- key conversion -------------------------------------------------------------------------------
def _layout(config: dict) -> UNetLayout:
    return UNetLayout({**config, "up_block_types": [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]})


def ldm_controlnet_to_diffusers(sd: dict[str, torch.Tensor], info: ControlNetInfo) -> tuple[dict, list[str]]:
    """Original-layout ControlNet tensors -> diffusers ControlNetModel names; returns (state dict, unknown keys)."""
    layout = _layout(info.config)
    n = len(info.prefix)
    hint_idx = sorted({int(k[n:].split(".")[1]) for k in sd if k.startswith(info.prefix + "input_hint_block.")})
    hint_names = {hint_idx[0]: "conv_in", hint_idx[-1]: "conv_out"}
    for j, idx in enumerate(hint_idx[1:-1]):
        hint_names[idx] = f"blocks.{j}"
    out, unknown = {}, []
    for full, v in sd.items():
        if not full.startswith(info.prefix):
            continue
        k = full[len(info.prefix):]
        p = k.split(".")
        nk = None
        if p[0] == "input_hint_block" and len(p) == 3 and int(p[1]) in hint_names:
            nk = f"controlnet_cond_embedding.{hint_names[int(p[1])]}.{p[2]}"
        elif p[0] == "zero_convs" and len(p) == 4 and p[2] == "0":
            nk = f"controlnet_down_blocks.{p[1]}.{p[3]}"
        elif p[0] == "middle_block_out" and len(p) == 3 and p[1] == "0":
            nk = f"controlnet_mid_block.{p[2]}"
        elif p[0] in ("time_embed", "label_emb", "input_blocks", "middle_block"):
            nk = unet_key_to_diffusers(k, layout)
        if nk is None:
            unknown.append(full)
        else:
            out[nk] = v
    return out, unknown


def diffusers_controlnet_to_ldm(sd: dict[str, torch.Tensor], config: dict, prefix: str = LDM_PREFIX) -> dict:
    """diffusers ControlNetModel tensors -> the original single-file layout (the exact inverse of the above)."""
    layout = _layout(config)
    n_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("controlnet_cond_embedding.blocks."))
    hint = {"conv_in": 0, "conv_out": 2 * (n_blocks + 1)}
    hint.update({f"blocks.{j}": 2 * (j + 1) for j in range(n_blocks)})
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "controlnet_cond_embedding":
            name = ".".join(p[1:-1])
            nk = f"input_hint_block.{hint[name]}.{p[-1]}"
        elif p[0] == "controlnet_down_blocks":
            nk = f"zero_convs.{p[1]}.0.{p[2]}"
        elif p[0] == "controlnet_mid_block":
            nk = f"middle_block_out.0.{p[1]}"
        else:
            nk = unet_key_to_ldm(k, layout)
        if nk is None:
            raise KeyError(f"no original-layout name for ControlNet key {k}")
        out[prefix + nk] = v
    return out


# -- loading --------------------------------------------------------------------------------------
def _global_average_pooling(path: Path) -> bool:
    """Shuffle models average their control over the image: `global_average_pooling: True` in the yaml beside
    the file (as sd-webui-controlnet reads it), or a name saying shuffle."""
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        text = yaml_path.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"global_average_pooling\s*:\s*(\w+)", text)
        if m:
            return m.group(1).lower() == "true"
    return "shuffle" in path.name.lower()


def load_controlnet(path: Path, *, dtype: torch.dtype = torch.float32, addition_time_embed_dim: int | None = None):
    """(diffusers ControlNetModel, or FluxControlNetModel for a FLUX ControlNet, on the CPU in `dtype`,
    ControlNetInfo) for a ControlNet file."""
    from diffusers import ControlNetModel

    from backend.engine.model_loader import build_without_weights, few_names, load_weights
    from backend.engine.state_dict_io import read_state_dict

    path = Path(path)
    sd = read_state_dict(path)
    try:
        info = detect_controlnet(sd, addition_time_embed_dim=addition_time_embed_dim)
    except UserError as exc:
        raise UserError(f"{path.name}: {exc.message}", status=exc.status) from exc
    if info.family == "flux":
        from backend.engine.families.flux_controlnet import load_flux_controlnet
        try:
            model = load_flux_controlnet(sd, info, dtype=dtype)
        except UserError as exc:
            raise UserError(f"{path.name}: {exc.message}", status=exc.status) from exc
        return model, info
    if info.layout == "ldm":
        weights, unknown = ldm_controlnet_to_diffusers(sd, info)
    else:
        weights, unknown = sd, []
    if unknown:
        log.warning("%s: %d tensors matched no rule and are ignored: %s", path.name, len(unknown), few_names(unknown))
    del sd
    if info.config.get("addition_embed_type") and info.config.get("addition_time_embed_dim") is None:
        raise UserError(f"{path.name}: cannot tell this SDXL ControlNet's size-embedding width (input "
                        f"{info.config['projection_class_embeddings_input_dim']}); load an SDXL checkpoint first.")
    model = build_without_weights(lambda: ControlNetModel(**info.config))
    load_weights(model, weights, f"ControlNet {path.name}", dtype=dtype, device="cpu")
    info.global_average_pooling = _global_average_pooling(path)
    return model, info
