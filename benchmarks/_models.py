"""Full-size SD 1.5 and SDXL architectures with random weights, written as real A1111-layout checkpoints.

The benchmarks time real architectures without downloading anything: `random_checkpoint(family, folder)`
builds the modules with the published SD 1.5 / SDXL shapes, fills them with seeded random weights, and
writes them through the same diffusers -> LDM converter the tests use. The file is kept in `folder` and
reused by later runs (it is several GB). `diffusers_config_folder` writes the local diffusers-format
config folder that `from_single_file(..., config=...)` needs to load the same file offline.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.engine.ldm_convert import diffusers_to_ldm  # noqa: E402
from backend.engine.model_detection import SD_VAE_SCALE, SDXL_VAE_SCALE, ModelSpec  # noqa: E402

_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "act_fn": "silu"}
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
           "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 768}
_CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
           "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
           "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0, "projection_dim": 1280}


def full_configs(family: str) -> dict:
    """The published architectures: {"unet", "vae", "text_encoders", "classes"}."""
    if family == "sd1":
        unet = {"sample_size": 64, "in_channels": 4, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
                "attention_head_dim": 8, "use_linear_projection": False, "norm_num_groups": 32}
        return {"unet": unet, "vae": dict(_VAE, scaling_factor=SD_VAE_SCALE), "text_encoders": [_CLIP_L],
                "classes": ["CLIPTextModel"]}
    if family == "sdxl":
        unet = {"sample_size": 128, "in_channels": 4, "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
                "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
        return {"unet": unet, "vae": dict(_VAE, scaling_factor=SDXL_VAE_SCALE), "text_encoders": [_CLIP_L, _CLIP_G],
                "classes": ["CLIPTextModel", "CLIPTextModelWithProjection"]}
    raise ValueError("family must be 'sd1' or 'sdxl'")


@torch.no_grad()
def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights that keep activations in range: N(0, 1/fan_in) matrices, norm scales near 1, small biases."""
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def random_checkpoint(family: str, folder: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0,
                      log=print) -> Path:
    """Write (once) and return `folder/random-<family>.safetensors`, an A1111-layout checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    path = folder / f"random-{family}-{str(dtype).replace('torch.', '')}.safetensors"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    configs = full_configs(family)
    generator = torch.Generator().manual_seed(seed)
    ldm: dict[str, torch.Tensor] = {}
    unet = UNet2DConditionModel(**configs["unet"])
    _randomize(unet, generator)
    vae = AutoencoderKL(**configs["vae"])
    _randomize(vae, generator)
    encoders = []
    for config, cls_name in zip(configs["text_encoders"], configs["classes"]):
        cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
        enc = cls(CLIPTextConfig(**config))
        _randomize(enc, generator)
        encoders.append(enc)
    spec = ModelSpec.for_family(family, configs["unet"], configs["vae"], configs["text_encoders"])
    text_sds = [{k: v for k, v in e.state_dict().items() if not k.endswith("position_ids")} for e in encoders]
    ldm = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_sds, spec)
    del unet, vae, encoders, text_sds
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ldm.items()}
    del ldm
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    return path


def diffusers_config_folder(family: str, folder: Path) -> Path:
    """A local diffusers-format config folder (configs, scheduler, tokenizer) for `from_single_file(config=...)`."""
    from backend.engine.tokenizer import clip_tokenizer

    configs = full_configs(family)
    root = Path(folder) / f"diffusers-config-{family}"
    sdxl = family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if sdxl:
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    files = {"model_index.json": index,
             "unet/config.json": dict(configs["unet"], _class_name="UNet2DConditionModel"),
             "vae/config.json": dict(configs["vae"], _class_name="AutoencoderKL"),
             "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085,
                                                 "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                                 "num_train_timesteps": 1000, "prediction_type": "epsilon",
                                                 "steps_offset": 1, "timestep_spacing": "leading"}}
    for i, (config, cls_name) in enumerate(zip(configs["text_encoders"], configs["classes"])):
        sub = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        files[f"{sub}/config.json"] = dict(config, architectures=[cls_name], model_type="clip_text_model")
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=1))
    for i in range(len(configs["text_encoders"])):
        sub = "tokenizer" if i == 0 else f"tokenizer_{i + 1}"
        clip_tokenizer("clip_g" if (sdxl and i == 1) else "clip_l").save_pretrained(str(root / sub))
    return root
