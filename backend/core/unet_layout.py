"""Stable Diffusion UNet facts shared by checkpoint and ControlNet detection, without torch.

What shapes cannot tell is taken from the families' published configs (GroupNorm's 32 groups, SD 1.x's
8 attention heads, 64 channels per head for SD 2.x and SDXL); `unet_input_levels` reads an LDM UNet's
(or ControlNet's) levels from its key names. The engine's `model_detection` reads checkpoints with these;
the app's `controlnet.model_files` reads ControlNet files' families from their headers with them.
"""
from __future__ import annotations

from backend.core.errors import UserError

GROUPS = 32
SD1_HEADS = 8
HEAD_CHANNELS = 64
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                "sdxl_refiner": "SDXL refiner", "flux": "FLUX.1", "sd3": "Stable Diffusion 3"}
FLOW_FAMILIES = ("flux", "sd3")  # the flow-matching transformers (backend.engine.families), completed by part files
# The status of "this FLUX.1 / SD3 file needs parts not chosen yet" (424 Failed Dependency): choosing such a checkpoint
# keeps it selected (its parts are chosen next), where any other load error puts the previous choice back.
MISSING_PARTS_STATUS = 424


def unet_input_levels(sd, n_input: int, what: str = "UNet") -> list[list[int]]:
    """The indices of an LDM UNet's (or ControlNet's) resnet input blocks, grouped by level.

    Walks `input_blocks.1` .. `input_blocks.{n_input - 1}` (keys without prefix): a resnet adds to the
    current level, a downsampler closes it. Every level must hold the same number of blocks; `what`
    names the network in the errors."""
    levels: list[list[int]] = [[]]
    for n in range(1, n_input):
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
        elif f"input_blocks.{n}.0.in_layers.0.weight" in sd:
            levels[-1].append(n)
        else:
            raise UserError(f"Unrecognized {what} block input_blocks.{n}.")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"Unsupported {what} layout: levels hold different numbers of blocks ({[len(l) for l in levels]}).")
    return levels
