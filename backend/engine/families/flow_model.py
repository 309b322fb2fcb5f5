"""`FlowModel`: a loaded FLUX.1 or Stable Diffusion 3 checkpoint, the modules the pipelines sample with
(engine: torch).

The transformer predicts the flow's velocity; the pipelines read the family's facts from here (16 latent
channels, the VAE's scale and shift, the flow schedule's shift, whether FLUX's distilled guidance is an input).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class FlowModel:
    family: str  # "flux" | "sd3"
    variant: str  # "flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large"
    transformer: nn.Module  # diffusers FluxTransformer2DModel / SD3Transformer2DModel
    vae: nn.Module  # diffusers AutoencoderKL with 16 latent channels
    text_encoders: dict[str, nn.Module]  # keys among "clip_l", "clip_g", "t5xxl"
    tokenizers: dict[str, object]  # the same keys
    vae_scale_factor: float
    vae_shift_factor: float
    shift: float  # the flow schedule's shift (FLUX: exp(mu))
    guidance_embeds: bool  # FLUX dev: the distilled guidance is an input of the transformer
    parts: dict[str, str] = field(default_factory=dict)  # part -> the file it came from

    @property
    def unet(self) -> nn.Module:
        """The denoiser (the device policy places it as an SD model's UNet)."""
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
