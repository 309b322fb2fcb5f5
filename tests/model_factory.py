"""Tiny Stable Diffusion checkpoints with the real architectures, written in the A1111 single-file layout.

`write_tiny_checkpoint(path, "sd1" | "sd2" | "sdxl", ...)` builds small random
diffusers/transformers modules shaped like the real ones (levels with and without
attention, SD2/SDXL linear projections and 64-channel heads, SDXL's size/crop
embedding and second text encoder with projection, a 4-level VAE that downsamples 8x),
converts them with `backend.engine.ldm_convert.diffusers_to_ldm` and writes them as
`.safetensors` or `.ckpt`, so tests exercise the same detection and loading code as
real files. Weights come from a seeded generator, scaled so outputs are not degenerate.

Plain module imported by fixtures (not a test file).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.engine.ldm_convert import diffusers_to_ldm  # noqa: E402
from backend.engine.model_detection import SD_VAE_SCALE, SDXL_VAE_SCALE, ModelSpec  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


def _clip_l(hidden: int = 32) -> dict:
    return {"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def _open_clip(hidden: int = 64, projection_dim: int | None = None) -> dict:
    config = {"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
              "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": 77, "hidden_act": "gelu",
              "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
    if projection_dim is not None:
        config["projection_dim"] = projection_dim
    return config


def tiny_configs(family: str, *, inpaint: bool = False) -> dict:
    """The tiny architecture per family: {"unet", "vae", "text_encoders": [...], "classes": [...]}."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    in_ch = 9 if inpaint else 4
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
           "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
           "scaling_factor": SDXL_VAE_SCALE if family == "sdxl" else SD_VAE_SCALE,
           "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
    if family == "sd1":
        # SD1 pattern: attention in the upper level(s), none in the deepest; 8 heads; conv proj_in.
        unet = {"sample_size": 64, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [32, 64], "layers_per_block": 1, "transformer_layers_per_block": [1, 1],
                "cross_attention_dim": 32, "attention_head_dim": 8, "use_linear_projection": False,
                "norm_num_groups": 32}
        texts, classes = [_clip_l(32)], ["CLIPTextModel"]
    elif family == "sd2":
        # SD2 pattern: as SD1 but 64-channel heads and linear proj_in/proj_out; OpenCLIP text encoder.
        unet = {"sample_size": 96, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [64, 128], "layers_per_block": 1, "transformer_layers_per_block": [1, 1],
                "cross_attention_dim": 64, "attention_head_dim": [1, 2], "use_linear_projection": True,
                "norm_num_groups": 32}
        texts, classes = [_open_clip(64)], ["CLIPTextModel"]
    elif family == "sdxl_refiner":
        # SDXL refiner pattern: OpenCLIP-G alone (context 64 here, 1280 full size) with its pooled projection (32);
        # label_emb input = pooled + 5 Fourier-embedded values (h, w, crop top, left, aesthetic score): 32 + 5 * 8
        pooled, time_dim = 32, 8
        unet = {"sample_size": 128, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [64, 128], "layers_per_block": 1, "transformer_layers_per_block": [1, 2],
                "cross_attention_dim": 64, "attention_head_dim": [1, 2], "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                "projection_class_embeddings_input_dim": pooled + 5 * time_dim, "norm_num_groups": 32}
        texts, classes = [_open_clip(64, projection_dim=pooled)], ["CLIPTextModelWithProjection"]
    else:
        # SDXL pattern: no attention in the first level, deeper transformers below (1/2/10 -> 0/2 here),
        # size/crop embedding; context = CLIP-L (32) + OpenCLIP-G (64); pooled = projection (32).
        pooled, time_dim = 32, 8
        unet = {"sample_size": 128, "in_channels": in_ch, "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [64, 128], "layers_per_block": 1, "transformer_layers_per_block": [1, 2],
                "cross_attention_dim": 96, "attention_head_dim": [1, 2], "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                "projection_class_embeddings_input_dim": pooled + 6 * time_dim, "norm_num_groups": 32}
        texts, classes = [_clip_l(32), _open_clip(64, projection_dim=pooled)], ["CLIPTextModel", "CLIPTextModelWithProjection"]
    return {"unet": unet, "vae": vae, "text_encoders": texts, "classes": classes}


@torch.no_grad()
def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights: matrices/kernels ~ N(0, 1/fan_in), norm scales ~ 1 ± 0.1, biases small."""
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def build_tiny_modules(family: str = "sd1", *, inpaint: bool = False, seed: int = 0) -> dict:
    """Random tiny modules: {"unet", "vae", "text_encoders": [...], "spec": ModelSpec}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = tiny_configs(family, inpaint=inpaint)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    encoders = []
    for config, cls_name in zip(configs["text_encoders"], configs["classes"]):
        cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
        encoders.append(cls(CLIPTextConfig(**config)))
    for module in (unet, vae, *encoders):
        _randomize(module, generator)
        module.eval().requires_grad_(False)
    spec = ModelSpec.for_family(family, configs["unet"], configs["vae"], configs["text_encoders"])
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "spec": spec}


def write_tiny_checkpoint(path: Path, family: str = "sd1", *, inpaint: bool = False, fmt: str = "safetensors",
                          dtype: torch.dtype = torch.float32, ema: bool = False, seed: int = 0) -> dict:
    """Write a tiny `family` checkpoint in the A1111 layout to `path`; return the originals.

    fmt: "safetensors" or "ckpt" (`torch.save({"state_dict": sd})`). dtype: the stored
    float precision. ema: also store `model_ema.*` copies of the UNet (with different
    values, as a trained checkpoint has) plus `model_ema.decay`/`num_updates`.

    Returns {"unet": sd, "vae": sd, "text_encoder": sd[, "text_encoder_2": sd]} (float32
    state dicts of the original modules, diffusers/transformers names) plus
    "modules": {"unet", "vae", "text_encoders": [...]} and "spec" (the ModelSpec used).
    """
    if fmt not in ("safetensors", "ckpt"):
        raise ValueError("fmt must be 'safetensors' or 'ckpt'")
    path = Path(path)
    built = build_tiny_modules(family, inpaint=inpaint, seed=seed)
    unet, vae, encoders, spec = built["unet"], built["vae"], built["text_encoders"], built["spec"]
    text_sds = [{k: v for k, v in enc.state_dict().items() if not k.endswith("position_ids")} for enc in encoders]
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_sds, spec)
    if ema:
        generator = torch.Generator().manual_seed(seed + 1000)
        for key, value in list(ldm.items()):
            if key.startswith("model.diffusion_model."):
                ema_key = "model_ema." + key[len("model."):].replace(".", "")
                ldm[ema_key] = torch.randn(value.shape, generator=generator).to(value.dtype)
        ldm["model_ema.decay"] = torch.tensor(0.9999)
        ldm["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in ldm.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(out, str(path), metadata={"format": "pt", "easel_test_family": family})
    else:
        torch.save({"state_dict": out}, path)

    result = {"unet": _clone(unet.state_dict()), "vae": _clone(vae.state_dict())}
    for index, enc in enumerate(encoders):
        result["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = _clone(enc.state_dict())
    result["modules"] = {"unet": unet, "vae": vae, "text_encoders": encoders}
    result["spec"] = spec
    return result


def _clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


if __name__ == "__main__":  # write one of each into a folder, for poking at by hand
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    for fam in FAMILIES:
        t0 = time.perf_counter()
        target = args.folder / f"tiny-{fam}.safetensors"
        write_tiny_checkpoint(target, fam)
        print(f"{target} ({target.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.2f} s")
