"""Builders of tiny FLUX.1 / SD3 test models (each helper of issue 15 adds its own functions here)."""
from __future__ import annotations

import hashlib

import torch

# -- SAMPLING: FlowModel objects built directly (random weights), and a stand-in text conditioner ----------------
FLUX_CONTEXT, FLUX_POOLED = 32, 24
SD3_CONTEXT, SD3_POOLED = 32, 24


def tiny_flow_vae(seed: int = 0):
    """A tiny 16-channel AutoencoderKL (8x down), as FLUX's and SD3's VAEs are."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4).eval()


def tiny_flux_model(guidance_embeds: bool = True, seed: int = 0):
    """A FlowModel holding a tiny FluxTransformer2DModel (dev when `guidance_embeds`, else schnell)."""
    from diffusers import FluxTransformer2DModel
    from backend.engine.families.flow_model import FlowModel
    from backend.engine.families.flow_schedule import default_shift
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=FLUX_CONTEXT, pooled_projection_dim=FLUX_POOLED,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)).eval()
    variant = "flux-dev" if guidance_embeds else "flux-schnell"
    return FlowModel(family="flux", variant=variant, transformer=transformer, vae=tiny_flow_vae(seed),
                     text_encoders={}, tokenizers={}, vae_scale_factor=0.3611, vae_shift_factor=0.1159,
                     shift=default_shift(variant), guidance_embeds=guidance_embeds,
                     parts={"transformer": "tiny-flux.safetensors"})


def tiny_sd3_model(seed: int = 0):
    """A FlowModel holding a tiny SD3Transformer2DModel (2 layers)."""
    from diffusers import SD3Transformer2DModel
    from backend.engine.families.flow_model import FlowModel
    from backend.engine.families.flow_schedule import SD3_SHIFT
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=SD3_CONTEXT,
                                        caption_projection_dim=32, pooled_projection_dim=SD3_POOLED, out_channels=16,
                                        pos_embed_max_size=32).eval()
    return FlowModel(family="sd3", variant="sd3.5-medium", transformer=transformer, vae=tiny_flow_vae(seed),
                     text_encoders={}, tokenizers={}, vae_scale_factor=1.5305, vae_shift_factor=0.0609,
                     shift=SD3_SHIFT, guidance_embeds=False, parts={"transformer": "tiny-sd3.safetensors"})


class StandInFlowConditioner:
    """What the pipelines call on a text conditioner, for a FlowModel: every prompt gets a fixed pseudo-random
    encoding of the model's widths (context [tokens, D], pooled [P]) derived from its text."""

    TOKENS = 8

    def __init__(self, model, device, embeddings=None, should_stop=None, emphasis="Original"):
        self.model, self.device = model, device
        self.context_dim, self.pooled_dim = ((FLUX_CONTEXT, FLUX_POOLED) if model.family == "flux"
                                             else (SD3_CONTEXT, SD3_POOLED))
        self.prompts: list[str] = []

    def encode(self, text: str):
        from backend.engine.conditioning import Conditioning
        self.prompts.append(text)
        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
        return Conditioning(crossattn=torch.randn(self.TOKENS, self.context_dim, generator=g).to(self.device),
                            pooled=torch.randn(self.pooled_dim, generator=g).to(self.device))

    def schedules(self, prompts, steps, is_negative, hires_steps=None):
        from backend.engine.conditioning import ScheduledConds
        return ScheduledConds([[(steps, self.encode(p))] for p in prompts])

    def empty_chunk(self):
        return self.encode("").crossattn
