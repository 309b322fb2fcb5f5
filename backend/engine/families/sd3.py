"""Stable Diffusion 3 / 3.5 (MMDiT): detection, config from shapes, and loading the transformer.

Stability AI's single files (and ComfyUI's) hold the transformer as `model.diffusion_model.*`:
`x_embedder.proj` (the patch embedding), `pos_embed` ([1, N, hidden], a sqrt(N) x sqrt(N) grid of
positions), `t_embedder.mlp.{0,2}` (timestep), `y_embedder.mlp.{0,2}` (pooled text),
`context_embedder` (T5/CLIP context -> hidden), `joint_blocks.N.{x_block,context_block}.{attn.qkv,
attn.proj, attn.ln_q, attn.ln_k, adaLN_modulation.1, mlp.fc1, mlp.fc2}` and `final_layer.{linear,
adaLN_modulation.1}`. The last joint block's context block is "pre-only" (no output projection or MLP).
Beside it the same file may carry the VAE (`first_stage_model.*`) and the text encoders
(`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, transformers' names), see `split_sd3_checkpoint`.

The variants, told apart by what their blocks hold:
- SD 3 Medium: 24 blocks, hidden 1536, no q/k norm.
- SD 3.5 Large (and Large Turbo): 38 blocks, hidden 2432, RMS q/k norm (`attn.ln_q` / `attn.ln_k`).
- SD 3.5 Medium (MMDiT-X): 24 blocks, RMS q/k norm, and a second self-attention of the image stream
  (`x_block.attn2.*`) in its first 13 blocks.

What shapes cannot tell comes from the published configs: 64 channels per attention head (SAI's
MMDiT sets hidden = 64 x depth; where `ln_q` exists its size says the head width), and the default
`sample_size` 128 (1024 px; it only seeds diffusers' positional table, which the file replaces).

Sampling facts for the sampling helper (flow matching, see `FlowModel`): the schedule's shift is
`SD3_SHIFT` for every variant; skip-layer guidance (SD 3.5, optional) re-runs the conditional pass
with some joint blocks skipped (`SD3Transformer2DModel.forward(..., skip_layers=[...])`) and adds
`scale * (cond - skipped)` to the CFG result between `start` and `end` of the schedule; Stability AI
recommends blocks 7, 8 and 9 for SD 3.5 Medium (`SLG_DEFAULT_LAYERS`; diffusers' SD3 pipeline
documents the same), ComfyUI's SkipLayerGuidanceSD3 node defaults to scale 3.0 between 1% and 15%.
"""
from __future__ import annotations

import logging
import math
import re

import torch

from backend.core.errors import UserError
from backend.engine.model_loader import few_names, load_weights

log = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "model.diffusion_model."
# the parts of a single SD3/3.5 file: part -> key prefix (stripped by split_sd3_checkpoint)
PART_PREFIXES = {
    "transformer": TRANSFORMER_PREFIX,
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
VARIANT_LABELS = {"sd3-medium": "Stable Diffusion 3 Medium", "sd3.5-medium": "Stable Diffusion 3.5 Medium",
                  "sd3.5-large": "Stable Diffusion 3.5 Large"}
HEAD_DIM = 64
SAMPLE_SIZE = 128
SD3_SHIFT = 3.0

SLG_DEFAULT_LAYERS = (7, 8, 9)
"""Joint blocks skipped in skip-layer guidance's extra pass: Stability AI's recommendation for SD 3.5 Medium."""
SLG_DEFAULT_SCALE = 3.0
SLG_DEFAULT_START = 0.01
SLG_DEFAULT_END = 0.15

# keys of ComfyUI's "scaled fp8" files (e.g. sd3.5_large_fp8_scaled.safetensors): float8 weights with a per-tensor
# `scale_weight` (weight = stored * scale_weight), `scale_input` (activation scale, unused when computing in bf16/fp32)
# and a `scaled_fp8` marker tensor
_SCALED_FP8_MARKER = "scaled_fp8"
_JOINT = re.compile(r"joint_blocks\.(\d+)\.")


def _bare(key: str) -> str:
    return key[len(TRANSFORMER_PREFIX):] if key.startswith(TRANSFORMER_PREFIX) else key


def _transformer_tensors(state_dict: dict) -> dict:
    """The transformer's tensors without the `model.diffusion_model.` prefix (a prefixed file: only those keys)."""
    if any(k.startswith(TRANSFORMER_PREFIX) for k in state_dict):
        return {k[len(TRANSFORMER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TRANSFORMER_PREFIX)}
    return dict(state_dict)


def is_sd3(keys) -> bool:
    """Whether the keys are an SD3/3.5 transformer in SAI's layout (`joint_blocks.N.x_block.*`, with or
    without `model.diffusion_model.`)."""
    has_blocks = has_patch = has_context = False
    for key in keys:
        bare = _bare(key)
        if bare.startswith("joint_blocks.") and ".x_block." in bare:
            has_blocks = True
        elif bare == "x_embedder.proj.weight":
            has_patch = True
        elif bare == "context_embedder.weight":
            has_context = True
        if has_blocks and has_patch and has_context:
            return True
    return False


def _shape(sd: dict, key: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in sd[key].shape)
    except KeyError:
        raise UserError(f"The Stable Diffusion 3 transformer is missing {key}; "
                        "the file is incomplete or of an unsupported layout.") from None


def _block_indices(sd: dict) -> list[int]:
    return sorted({int(m.group(1)) for k in sd for m in [_JOINT.match(k)] if m})


def sd3_config(state_dict: dict) -> dict:
    """`diffusers.SD3Transformer2DModel` kwargs read from the transformer's tensors (prefixed or not)."""
    sd = _transformer_tensors(state_dict)
    blocks = _block_indices(sd)
    if not blocks:
        raise UserError("The file holds no Stable Diffusion 3 joint blocks.")
    if blocks != list(range(len(blocks))):
        missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise UserError(f"The Stable Diffusion 3 transformer lacks joint blocks {missing}; the file is incomplete.")
    hidden, in_channels, patch, _ = _shape(sd, "x_embedder.proj.weight")
    pos = _shape(sd, "pos_embed")
    grid = math.isqrt(pos[-2])
    if len(pos) != 3 or grid * grid != pos[-2] or pos[-1] != hidden:
        raise UserError(f"Unsupported Stable Diffusion 3 positional table of shape {list(pos)} "
                        f"(expected [1, N*N, {hidden}]).")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    if qk_norm:
        head_dim = _shape(sd, "joint_blocks.0.x_block.attn.ln_q.weight")[0]
    else:
        head_dim = HEAD_DIM
    if hidden % head_dim:
        raise UserError(f"Unsupported Stable Diffusion 3 transformer: hidden size {hidden} is not a multiple of "
                        f"its {head_dim}-channel attention heads.")
    context_out, context_in = _shape(sd, "context_embedder.weight")
    final_out = _shape(sd, "final_layer.linear.weight")[0]
    dual = sorted({i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd})
    return {
        "sample_size": SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": len(blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": context_in,
        "caption_projection_dim": context_out,
        "pooled_projection_dim": _shape(sd, "y_embedder.mlp.0.weight")[1],
        "out_channels": final_out // (patch * patch),
        "pos_embed_max_size": grid,
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def sd3_variant(state_dict: dict) -> str:
    """"sd3-medium" | "sd3.5-medium" | "sd3.5-large", from the blocks' contents (prefixed keys or not).

    3.5 has q/k norms (`attn.ln_q`); 3.5 Medium's image stream also has a second attention (`x_block.attn2`);
    Large and Large Turbo share one architecture."""
    keys = [_bare(k) for k in state_dict]
    if any(".x_block.attn2." in k for k in keys if k.startswith("joint_blocks.")):
        return "sd3.5-medium"
    if any(".attn.ln_q." in k for k in keys if k.startswith("joint_blocks.")):
        return "sd3.5-large"
    return "sd3-medium"


def split_sd3_checkpoint(state_dict: dict) -> dict[str, dict]:
    """The parts of a single SD3/3.5 file, prefixes stripped: "transformer", "vae", "clip_l", "clip_g", "t5xxl".

    Parts the file lacks are absent. A transformer-only file without the `model.diffusion_model.` prefix
    (SAI names at the top level) gives its tensors as "transformer". Keys of no part are left out."""
    parts: dict[str, dict] = {}
    rest: dict = {}
    for key, value in state_dict.items():
        for part, prefix in PART_PREFIXES.items():
            if key.startswith(prefix):
                parts.setdefault(part, {})[key[len(prefix):]] = value
                break
        else:
            rest[key] = value
    if "transformer" not in parts and is_sd3(rest.keys()):
        parts["transformer"], rest = rest, {}
    if rest:
        log.info("SD3 checkpoint: %d tensors belong to no part and are left out: %s", len(rest), few_names(rest))
    return parts


def _dequantize_scaled_fp8(sd: dict, dtype: torch.dtype) -> dict:
    """ComfyUI's scaled-fp8 weights as plain `dtype` tensors (stored * scale_weight); other files unchanged."""
    if _SCALED_FP8_MARKER not in sd and not any(k.endswith(".scale_weight") for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        if key == _SCALED_FP8_MARKER or key.endswith(".scale_input") or key.endswith(".scale_weight"):
            continue
        scale = sd.get(key[:-len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            value = (value.to(torch.float32) * scale.to(torch.float32)).to(dtype)
        out[key] = value
    return out


def sd3_to_diffusers(state_dict: dict, *, dtype: torch.dtype = torch.float32) -> dict:
    """The transformer's tensors (SAI names, prefixed or not) renamed to `SD3Transformer2DModel`'s.

    Uses diffusers' converter (q/k/v split, the final layers' shift/scale halves swapped); a tensor it needs
    and does not find, or one inside the joint blocks it does not place, is an error, so an unknown variant
    is not half-loaded (stray tensors outside the blocks are logged and ignored)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = _transformer_tensors(state_dict)
    odd = sorted(k for k, v in sd.items() if type(v) not in (torch.Tensor, torch.nn.Parameter))
    if odd:
        raise UserError("This Stable Diffusion 3 file holds quantized (GGUF or similar) tensors, e.g. "
                        f"{few_names(odd, 2)}; Easel loads SD 3/3.5 transformers stored in bf16, fp16, fp32 or fp8 "
                        "(.safetensors).")
    work = _dequantize_scaled_fp8(sd, dtype)  # a new dict when it changed anything; the converter pops from `work`
    work = dict(work)
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(work)
    except KeyError as e:
        raise UserError(f"The Stable Diffusion 3 transformer is missing {e.args[0]}; "
                        "the file is incomplete or of an unsupported variant.") from None
    in_blocks = [k for k in work if k.startswith("joint_blocks.")]
    if in_blocks:  # a part of the architecture that would be left out: refuse rather than compute something else
        raise UserError(f"The Stable Diffusion 3 transformer has {len(in_blocks)} tensors Easel does not know "
                        f"({few_names(in_blocks, 3)}); it may be an unsupported variant.")
    if work:
        log.warning("SD3 transformer: ignoring %d tensors outside its blocks: %s", len(work), few_names(work))
    return converted


def load_sd3_transformer(state_dict: dict, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu"):
    """A `diffusers.SD3Transformer2DModel` from the transformer's tensors (SAI layout, prefixed or not),
    built empty from `sd3_config` and assigned (cast to `dtype` on `device`, eval, no grad).

    float8 tensors are upcast to `dtype` as they are assigned; the caller's dict is not changed."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    config = sd3_config(state_dict)
    weights = sd3_to_diffusers(state_dict, dtype=dtype)
    # buffers on the meta device too: the positional table (up to 384 x 384 positions) comes from the file
    with init_empty_weights(include_buffers=True):
        transformer = SD3Transformer2DModel(**config)
    label = VARIANT_LABELS[sd3_variant(state_dict)]
    load_weights(transformer, weights, f"{label} transformer", dtype=dtype, device=device)
    left = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"The {label} transformer was not fully loaded (no weights for {few_names(left, 3)}).")
    return transformer
