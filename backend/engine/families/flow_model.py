"""A loaded FLUX.1 or Stable Diffusion 3 model: its modules and what sampling needs to know about it.

The counterpart of `model_loader.SDModel` for the flow-matching families. `unet` names the transformer, so
the device policy, the model cache and the pipelines place and call it as the denoiser; `text_encoders` and
`tokenizers` are keyed by part ("clip_l", "clip_g", "t5xxl"); `parts` names the file each part came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class FlowModel:
    family: str  # "flux" | "sd3"
    variant: str  # "flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large"
    transformer: torch.nn.Module  # diffusers FluxTransformer2DModel / SD3Transformer2DModel
    vae: Any  # diffusers AutoencoderKL with 16 latent channels
    text_encoders: dict[str, torch.nn.Module]  # keys among "clip_l", "clip_g", "t5xxl"
    tokenizers: dict[str, Any]  # the same keys
    vae_scale_factor: float
    vae_shift_factor: float
    shift: float  # the flow schedule's shift
    guidance_embeds: bool  # FLUX dev: the transformer takes the distilled guidance
    parts: dict[str, str] = field(default_factory=dict)  # part -> the file it came from

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the device policy and the pipelines use for every family."""
        return self.transformer

    @property
    def latent_channels(self) -> int:
        return 16

    @property
    def vae_downsample(self) -> int:
        return 8

    @property
    def is_inpaint(self) -> bool:
        return False

    @property
    def is_sdxl(self) -> bool:
        return False

    @property
    def prediction_type(self) -> str:
        return "flow"
