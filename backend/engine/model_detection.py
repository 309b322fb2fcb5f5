"""What a single-file Stable Diffusion checkpoint is, read from its keys and tensor shapes.

Checkpoints in the CompVis/A1111 layout carry no config. As ComfyUI does, we read the
architecture from the tensors: channel counts from weight shapes, the number of
levels and blocks from the key names, which levels have transformers, the context
width from the cross-attention projections, the text encoders from their key
prefixes. So a real SD 1.5 file and a 2 MB test checkpoint go through the same code.

What shapes cannot tell is taken from the family's published configs:
- GroupNorm uses 32 groups (channel counts must be divisible by 32),
- SD1 attention uses 8 heads; SD2 and SDXL use 64 channels per head,
- SD1's text encoder is OpenAI CLIP (quick_gelu); SD2's and SDXL's second are OpenCLIP (gelu),
- VAE latent scaling 0.18215 (SD1/SD2) or 0.13025 (SDXL).

Families and their text-encoder keys:
- sd1:  `cond_stage_model.transformer.text_model.*` (OpenAI CLIP ViT-L/14, HF layout)
- sd2:  `cond_stage_model.model.*` (OpenCLIP ViT-H/14 layout)
- sdxl: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
        `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, with `text_projection`)
UNet keys: `model.diffusion_model.*`; VAE keys: `first_stage_model.*`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from backend.core.errors import UserError
from backend.core.unet_layout import FAMILY_NAMES, GROUPS, HEAD_CHANNELS, SD1_HEADS, unet_input_levels

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."

SD_VAE_SCALE = 0.18215
SDXL_VAE_SCALE = 0.13025
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77
SUPPORTED = "Stable Diffusion 1.x, Stable Diffusion 2.x, SDXL and SDXL refiner checkpoints"


@dataclass
class ModelSpec:
    """The architecture of a checkpoint, as constructor kwargs for the diffusers/transformers modules.

    - `unet_config`: kwargs for `diffusers.UNet2DConditionModel`.
    - `vae_config`: kwargs for `diffusers.AutoencoderKL`.
    - `text_encoder_configs`: kwargs for `transformers.CLIPTextConfig`, one per encoder.
    - `text_encoder_classes`: "CLIPTextModel" or "CLIPTextModelWithProjection" per encoder
      (SDXL's second encoder has the projection that makes the pooled embedding).
    - `text_encoder_layouts`: "openai" (HF CLIP names) or "openclip" per encoder;
      `text_encoder_prefixes`: where each encoder's keys live in the checkpoint.
    - `default_clip_skip`: which layer the family's conditioning reads, counted from the
      end (1 = last, 2 = penultimate): 1 for sd1, 2 for sd2 (A1111's SD2 config says
      `layer: penultimate`, with the final LayerNorm applied after), 2 for sdxl (both
      encoders' penultimate hidden states, without the final LayerNorm, concatenated;
      the pooled vector is encoder 2's projected final EOS state).
      `text_encoder_layer` says the same in words; `final_norm_on_hidden` says whether
      the final LayerNorm is applied to the chosen hidden state.
    - `prediction_type`: "epsilon" or "v_prediction"; `prediction_type_known` is False
      where the file cannot tell (SD2) and the loader decides (yaml beside the file, or
      A1111's test run of the UNet).
    - `zero_terminal_snr`: the file says (key `ztsnr`) it was trained with zero terminal SNR.
    """

    family: str
    unet_config: dict
    vae_config: dict
    text_encoder_configs: list[dict]
    text_encoder_classes: list[str] = field(default_factory=list)
    text_encoder_layouts: list[str] = field(default_factory=list)
    text_encoder_prefixes: list[str] = field(default_factory=list)
    is_inpaint: bool = False
    prediction_type: str = "epsilon"
    prediction_type_known: bool = True
    is_sdxl: bool = False
    default_clip_skip: int = 1
    text_encoder_layer: str = "last"
    final_norm_on_hidden: bool = True
    zero_terminal_snr: bool = False

    @property
    def vae_scale_factor(self) -> float:
        """The latent scaling factor (latents = VAE mean * this)."""
        return float(self.vae_config.get("scaling_factor", SD_VAE_SCALE))

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent cell along each side (8 for every SD VAE)."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet_config["in_channels"])

    @classmethod
    def for_family(cls, family: str, unet_config: dict, vae_config: dict, text_encoder_configs: list[dict], *,
                   prediction_type: str = "epsilon") -> "ModelSpec":
        """A spec for modules built in code (test fixtures, saving): family defaults filled in."""
        if family not in FAMILY_DEFAULTS:
            raise ValueError(f"unknown family {family!r}")
        d = FAMILY_DEFAULTS[family]
        return cls(family=family, unet_config=dict(unet_config), vae_config=dict(vae_config),
                   text_encoder_configs=[dict(c) for c in text_encoder_configs],
                   text_encoder_classes=list(d["classes"]), text_encoder_layouts=list(d["layouts"]),
                   text_encoder_prefixes=list(d["prefixes"]), is_inpaint=unet_config.get("in_channels", 4) == 9,
                   prediction_type=prediction_type, prediction_type_known=True, is_sdxl=family == "sdxl",
                   default_clip_skip=d["clip_skip"], text_encoder_layer=d["layer"], final_norm_on_hidden=d["final_norm"])


FAMILY_DEFAULTS = {
    "sd1": {"classes": ["CLIPTextModel"], "layouts": ["openai"], "prefixes": [SD1_TEXT_PREFIX + "text_model."],
            "clip_skip": 1, "layer": "last", "final_norm": True},
    "sd2": {"classes": ["CLIPTextModel"], "layouts": ["openclip"], "prefixes": [SD2_TEXT_PREFIX],
            "clip_skip": 2, "layer": "penultimate", "final_norm": True},
    "sdxl": {"classes": ["CLIPTextModel", "CLIPTextModelWithProjection"], "layouts": ["openai", "openclip"],
             "prefixes": [SDXL_TEXT1_PREFIX + "text_model.", SDXL_TEXT2_PREFIX],
             "clip_skip": 2, "layer": "penultimate", "final_norm": False},
    # the SDXL refiner: OpenCLIP ViT-bigG alone (its penultimate layer and pooled projection), aesthetic score
    "sdxl_refiner": {"classes": ["CLIPTextModelWithProjection"], "layouts": ["openclip"],
                     "prefixes": [SDXL_REFINER_TEXT_PREFIX], "clip_skip": 2, "layer": "penultimate",
                     "final_norm": False},
}


# ----------------------------------------------------------------------------------------------
def detect_checkpoint(state_dict: dict[str, torch.Tensor]) -> ModelSpec:
    """Read the architecture of an A1111/CompVis-layout checkpoint from its keys and shapes."""
    keys = state_dict.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX + "input_blocks.") or not has(UNET_PREFIX + "output_blocks."):
        raise UserError(f"Unsupported model file: {describe_unknown(state_dict)}. Easel loads {SUPPORTED} "
                        f"in the A1111/CompVis single-file layout.")

    if has(SDXL_TEXT1_PREFIX) and has(SDXL_TEXT2_PREFIX):
        family = "sdxl"
        text_prefixes = [_openai_prefix(state_dict, SDXL_TEXT1_PREFIX), SDXL_TEXT2_PREFIX]
        layouts = ["openai", "openclip"]
        classes = ["CLIPTextModel", "CLIPTextModelWithProjection"]
    elif has(SDXL_REFINER_TEXT_PREFIX) and not has(SDXL_TEXT1_PREFIX) and not has("conditioner.embedders.1."):
        # the SDXL refiner: conditioner.embedders.0 is OpenCLIP ViT-bigG (no CLIP-L), label_emb takes the pooled
        # vector + size/crop + aesthetic score (A1111 and ComfyUI detect it so)
        family = "sdxl_refiner"
        text_prefixes = [SDXL_REFINER_TEXT_PREFIX]
        layouts, classes = ["openclip"], ["CLIPTextModelWithProjection"]
    elif has(SD1_TEXT_PREFIX):
        family = "sd1"
        text_prefixes = [_openai_prefix(state_dict, SD1_TEXT_PREFIX)]
        layouts, classes = ["openai"], ["CLIPTextModel"]
    elif has(SD2_TEXT_PREFIX):
        family = "sd2"
        text_prefixes = [SD2_TEXT_PREFIX]
        layouts, classes = ["openclip"], ["CLIPTextModel"]
    else:
        raise UserError("This checkpoint has a Stable Diffusion UNet but no text encoder Easel recognizes "
                        "(expected cond_stage_model.* or conditioner.embedders.*). "
                        f"Easel loads {SUPPORTED} that include their text encoder and VAE.")
    if not has(VAE_PREFIX + "encoder.") or not has(VAE_PREFIX + "decoder."):
        raise UserError(f"This {FAMILY_NAMES[family]} checkpoint holds no VAE (first_stage_model.*). "
                        "Easel needs checkpoints that include their VAE.")

    text_configs = []
    for prefix, layout, cls_name in zip(text_prefixes, layouts, classes):
        text_configs.append(detect_text_encoder(state_dict, prefix, layout, with_projection=cls_name.endswith("Projection")))

    pooled_dim = (text_configs[1]["projection_dim"] if family == "sdxl"
                  else text_configs[0]["projection_dim"] if family == "sdxl_refiner" else None)
    unet_config = detect_unet(state_dict, family, pooled_dim=pooled_dim)
    context = sum(c["hidden_size"] for c in text_configs)
    if unet_config["cross_attention_dim"] != context:
        raise UserError(f"Inconsistent checkpoint: the UNet expects text features of width "
                        f"{unet_config['cross_attention_dim']} but the text encoder(s) give {context}. "
                        "The file may be a damaged merge.")
    vae_config = detect_vae(state_dict, VAE_PREFIX,
                            scaling_factor=SDXL_VAE_SCALE if family in ("sdxl", "sdxl_refiner") else SD_VAE_SCALE)

    d = FAMILY_DEFAULTS[family]
    prediction_type, known = "epsilon", family != "sd2"
    if "v_pred" in keys:  # marker key written by some v-prediction SDXL/SD1 trainers (ComfyUI honours it)
        prediction_type, known = "v_prediction", True
    return ModelSpec(
        family=family, unet_config=unet_config, vae_config=vae_config, text_encoder_configs=text_configs,
        text_encoder_classes=classes, text_encoder_layouts=layouts, text_encoder_prefixes=text_prefixes,
        is_inpaint=unet_config["in_channels"] == 9, prediction_type=prediction_type, prediction_type_known=known,
        is_sdxl=family == "sdxl", default_clip_skip=d["clip_skip"], text_encoder_layer=d["layer"],
        final_norm_on_hidden=d["final_norm"], zero_terminal_snr="ztsnr" in keys,
    )


def _openai_prefix(state_dict, base: str) -> str:
    """`...transformer.text_model.` (current layout) or `...transformer.` (old transformers layout)."""
    if any(k.startswith(base + "text_model.") for k in state_dict):
        return base + "text_model."
    return base


def describe_unknown(state_dict: dict) -> str:
    """A short guess at what a file that is not an SD checkpoint is, for error messages."""
    keys = list(state_dict.keys())
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    starts = lambda s: any(k.startswith(s) for k in keys)  # noqa: E731
    if has("joint_blocks.") and has("x_embedder"):
        return "it looks like a Stable Diffusion 3 model"
    if has("double_blocks.") and has("single_blocks."):
        return "it looks like a Flux model"
    if has("down_blocks.") and has("time_embedding.") and not starts(UNET_PREFIX):
        return "it looks like a diffusers-format UNet, not a single-file checkpoint"
    if starts("lora_unet_") or starts("lora_te") or has(".lora_down.") or has("lora_A."):
        return "it looks like a LoRA (put it in models/Lora)"
    if starts("control_model.") or has("input_hint_block."):
        return "it looks like a ControlNet model (put it in models/ControlNet)"
    if (starts("encoder.down.") and starts("decoder.up.")) or (starts(VAE_PREFIX) and not starts(UNET_PREFIX)):
        return "it looks like a standalone VAE (put it in models/VAE)"
    if has("transformer_blocks.") and has("adaln"):
        return "it looks like a transformer-based diffusion model"
    if starts("string_to_param") or starts("emb_params"):
        return "it looks like a textual-inversion embedding (put it in embeddings/)"
    sample = ", ".join(keys[:4]) if keys else "no tensors"
    return f"its keys do not match any supported layout (found {len(keys)} tensors, e.g. {sample})"


# -- text encoders ------------------------------------------------------------------------------
def detect_text_encoder(state_dict, prefix: str, layout: str, *, with_projection: bool = False) -> dict:
    """CLIPTextConfig kwargs for the encoder whose keys start with `prefix`."""
    if layout == "openai":
        tok = _get(state_dict, prefix + "embeddings.token_embedding.weight")
        pos = _get(state_dict, prefix + "embeddings.position_embedding.weight")
        layer_re = re.compile(re.escape(prefix + "encoder.layers.") + r"(\d+)\.")
        fc1 = prefix + "encoder.layers.0.mlp.fc1.weight"
        act = "quick_gelu"
    else:
        tok = _get(state_dict, prefix + "token_embedding.weight")
        pos = _get(state_dict, prefix + "positional_embedding")
        layer_re = re.compile(re.escape(prefix + "transformer.resblocks.") + r"(\d+)\.")
        fc1 = prefix + "transformer.resblocks.0.mlp.c_fc.weight"
        act = "gelu"
    layers = _count_indices(state_dict, layer_re)
    if layers == 0:
        raise UserError(f"The text encoder at {prefix}* has no transformer layers; the checkpoint is incomplete.")
    hidden = int(tok.shape[1])
    config = {
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(_get(state_dict, fc1).shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_CHANNELS),
        "max_position_embeddings": int(pos.shape[0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1 if layout == "openai" else 0,
    }
    if with_projection:
        proj = state_dict.get(prefix + "text_projection")
        if proj is None:
            raise UserError(f"The text encoder at {prefix}* lacks its text_projection; the checkpoint is incomplete.")
        # OpenCLIP stores x @ text_projection, i.e. [hidden, projection]
        config["projection_dim"] = int(proj.shape[1])
    return config


# -- UNet ---------------------------------------------------------------------------------------
def detect_unet(state_dict, family: str, *, pooled_dim: int | None = None, prefix: str = UNET_PREFIX) -> dict:
    """UNet2DConditionModel kwargs read from an LDM UNet's keys and shapes."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    conv_in = _get(sd, "input_blocks.0.0.weight", prefix)
    model_channels = int(conv_in.shape[0])
    in_channels = int(conv_in.shape[1])
    out_channels = int(_get(sd, "out.2.weight", prefix).shape[0])

    n_input = _count_indices(sd, re.compile(r"input_blocks\.(\d+)\."))
    n_output = _count_indices(sd, re.compile(r"output_blocks\.(\d+)\."))

    levels = unet_input_levels(sd, n_input)
    layers_per_block = len(levels[0])
    n_levels = len(levels)
    if n_output != n_levels * (layers_per_block + 1):
        raise UserError(f"Unsupported UNet layout: {n_output} output blocks for {n_levels} levels of "
                        f"{layers_per_block} blocks.")

    block_out = [int(_get(sd, f"input_blocks.{level[0]}.0.out_layers.3.weight", prefix).shape[0]) for level in levels]
    down_depths = [[_transformer_depth(sd, f"input_blocks.{n}.1.") for n in level] for level in levels]
    up_depths = [[_transformer_depth(sd, f"output_blocks.{i * (layers_per_block + 1) + j}.1.")
                  for j in range(layers_per_block + 1)] for i in range(n_levels)]
    mid_depth = _transformer_depth(sd, "middle_block.1.")
    if mid_depth == 0 or "middle_block.2.in_layers.0.weight" not in sd:
        raise UserError("Unsupported UNet layout: the middle block has no transformer.")

    down_attn = [any(d) for d in down_depths]
    up_attn = [any(d) for d in up_depths]
    for name, depths in (("input", down_depths), ("output", up_depths)):
        for level, d in enumerate(depths):
            if any(d) and not all(d):
                raise UserError(f"Unsupported UNet layout: {name} level {level} mixes blocks with and without attention.")

    # diffusers: one entry per down level (int, or per-block list); the middle block uses the last entry.
    tlpb: list = []
    for level, d in enumerate(down_depths):
        if not down_attn[level]:
            tlpb.append(mid_depth if level == n_levels - 1 else 1)
        else:
            tlpb.append(d[0] if len(set(d)) == 1 else list(d))
    if down_attn[-1] and tlpb[-1] != mid_depth:
        raise UserError("Unsupported UNet layout: the deepest level's transformer depth differs from the middle block's.")
    symmetric = all((up_depths[n_levels - 1 - level] == [tlpb[level]] * (layers_per_block + 1)) or not up_attn[n_levels - 1 - level]
                    for level in range(n_levels)) and all(isinstance(t, int) for t in tlpb)

    attn_key = _first_key(sd, r"\.transformer_blocks\.0\.attn2\.to_k\.weight$")
    if attn_key is None:
        raise UserError("Unsupported UNet: no cross-attention layers found.")
    cross_dim = int(sd[attn_key].shape[1])
    proj_in = sd[_first_key(sd, r"\.1\.proj_in\.weight$")]
    use_linear = proj_in.ndim == 2

    if family == "sd1":
        heads: int | list[int] = SD1_HEADS
    else:
        heads = [max(1, c // HEAD_CHANNELS) for c in block_out]

    time_embed = _get(sd, "time_embed.0.weight", prefix)
    if int(time_embed.shape[1]) != model_channels:
        raise UserError("Unsupported UNet: its timestep embedding width differs from its base channel count.")
    config = {
        "sample_size": 64 if family == "sd1" else 96 if family == "sd2" else 128,  # SDXL and its refiner: 128
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": block_out,
        "layers_per_block": layers_per_block,
        "transformer_layers_per_block": tlpb,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": use_linear,
        "norm_num_groups": GROUPS,
    }
    if int(time_embed.shape[0]) != 4 * model_channels:
        config["time_embedding_dim"] = int(time_embed.shape[0])
    if not symmetric:
        config["reverse_transformer_layers_per_block"] = [
            list(d) if up_attn[i] else [1] * (layers_per_block + 1) for i, d in enumerate(up_depths)]
    if "label_emb.0.0.weight" in sd and family in ("sdxl", "sdxl_refiner"):
        # pooled text embedding + Fourier-embedded values: original height, width, crop top, left, then target
        # height, width (SDXL) or the aesthetic score (the SDXL refiner)
        values, what = (5, "size/crop/aesthetic") if family == "sdxl_refiner" else (6, "size/crop")
        adm_in = int(sd["label_emb.0.0.weight"].shape[1])
        if pooled_dim is None or (adm_in - pooled_dim) <= 0 or (adm_in - pooled_dim) % values:
            raise UserError(f"Unsupported {FAMILY_NAMES[family]} variant: additional embedding input width {adm_in} "
                            f"does not match a pooled text embedding of {pooled_dim} plus {values} {what} values.")
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = (adm_in - pooled_dim) // values
        config["projection_class_embeddings_input_dim"] = adm_in
    elif "label_emb.0.0.weight" in sd:
        raise UserError(f"Unsupported {FAMILY_NAMES[family]} variant: its UNet has a class/image embedding "
                        "(unCLIP or similar), which Easel does not load.")
    elif family in ("sdxl", "sdxl_refiner"):
        raise UserError(f"Unsupported {FAMILY_NAMES[family]} variant: its UNet has no size/crop embedding (label_emb).")
    return config


def _transformer_depth(sd, block_prefix: str) -> int:
    pat = re.compile(re.escape(block_prefix) + r"transformer_blocks\.(\d+)\.")
    return _count_indices(sd, pat)


# -- VAE ----------------------------------------------------------------------------------------
def detect_vae(state_dict, prefix: str = VAE_PREFIX, *, scaling_factor: float = SD_VAE_SCALE) -> dict:
    """AutoencoderKL kwargs read from an LDM VAE's keys (under `prefix`) and shapes."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    conv_in = _get(sd, "encoder.conv_in.weight", prefix)
    n_levels = _count_indices(sd, re.compile(r"encoder\.down\.(\d+)\."))
    if n_levels == 0:
        raise UserError("The VAE has no encoder levels; the file is incomplete.")
    layers = _count_indices(sd, re.compile(r"encoder\.down\.0\.block\.(\d+)\."))
    block_out = [int(_get(sd, f"encoder.down.{i}.block.0.conv2.weight", prefix).shape[0]) for i in range(n_levels)]
    dec_layers = _count_indices(sd, re.compile(r"decoder\.up\.0\.block\.(\d+)\."))
    if dec_layers != layers + 1:
        raise UserError(f"Unsupported VAE layout: {layers} encoder blocks per level but {dec_layers} decoder blocks.")
    latent = int(_get(sd, "decoder.conv_in.weight", prefix).shape[1])
    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(_get(sd, "decoder.conv_out.weight", prefix).shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n_levels,
        "up_block_types": ["UpDecoderBlock2D"] * n_levels,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": GROUPS,
        "sample_size": 512,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in sd),
    }


# -- helpers ------------------------------------------------------------------------------------
def _get(sd, key: str, prefix: str = "") -> torch.Tensor:
    try:
        return sd[key]
    except KeyError:
        raise UserError(f"The checkpoint is missing {prefix}{key}; it is incomplete or of an unsupported layout.") from None


def _count_indices(sd, pattern: re.Pattern) -> int:
    found = set()
    for k in sd:
        m = pattern.match(k)
        if m:
            found.add(int(m.group(1)))
    return max(found) + 1 if found else 0


def _first_key(sd, pattern: str) -> str | None:
    rx = re.compile(pattern)
    for k in sd:
        if rx.search(k):
            return k
    return None
