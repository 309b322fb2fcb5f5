"""Tiny random ControlNets built from the tiny fixture UNets, written as real ControlNet files.

`write_tiny_controlnet(path, "sd1" | "sd2" | "sdxl", layout="original" | "diffusers", ...)` builds
`diffusers.ControlNetModel.from_unet` on the tiny UNet of `model_factory`, gives it seeded random
weights (zero convolutions included, so the control has an effect), and writes it either in the
original ControlNet 1.1 single-file layout (`control_model.*` keys, `.pth` or `.safetensors`,
optionally float16 as the "pruned fp16" downloads are) or in the diffusers layout (as SDXL
ControlNets are downloaded). Plain module imported by tests.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.engine.controlnet.model_files import diffusers_controlnet_to_ldm  # noqa: E402
from model_factory import _randomize, tiny_configs  # noqa: E402


def build_tiny_controlnet(family: str = "sd1", seed: int = 0, zero_scale: float = 1.0):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_configs(family)["unet"])
    cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    generator = torch.Generator().manual_seed(seed)
    _randomize(cn, generator)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.mul_(zero_scale)
    return cn.eval().requires_grad_(False)


def write_tiny_controlnet(path: Path, family: str = "sd1", *, layout: str = "original", fmt: str | None = None,
                          dtype: torch.dtype = torch.float32, seed: int = 0, prefix: bool = True,
                          zero_scale: float = 1.0):
    """Write a tiny ControlNet to `path`; returns the ControlNetModel it was made from (float32)."""
    path = Path(path)
    fmt = fmt or ("safetensors" if path.suffix == ".safetensors" else "pth")
    cn = build_tiny_controlnet(family, seed, zero_scale)
    sd = cn.state_dict()
    if layout == "original":
        sd = diffusers_controlnet_to_ldm(sd, dict(cn.config), prefix="control_model." if prefix else "")
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(out, str(path))
    else:
        torch.save(out, path)
    return cn
