"""The separate parts FLUX.1 and Stable Diffusion 3 files are completed with: what a file is, and its text encoders.

People keep these parts as files of their own in models/VAE, models/text_encoder and models/clip:

- "vae": `ae.safetensors` (FLUX), SD3's VAE: CompVis/ldm names `encoder.down.*` (maybe with `first_stage_model.`
  or `vae.` in front), or diffusers names `encoder.down_blocks.*`;
- "clip_l": `clip_l.safetensors`: transformers CLIPTextModel names `text_model.*`, width 768 (SD3's copy also has
  a `text_projection.weight`);
- "clip_g": `clip_g.safetensors`: transformers CLIPTextModelWithProjection names, width 1280,
  `text_projection.weight`;
- "t5xxl": `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`: transformers T5EncoderModel names
  `encoder.block.N.layer.*`, `shared.weight`, `encoder.final_layer_norm.weight`.

ComfyUI writes the encoders with a prefix `text_encoders.<name>.transformer.` (also inside SD3/FLUX all-in-one
files); it is removed here. What a file is comes from its structure (T5 blocks or CLIP layers) and its width (768:
CLIP-L, 1280: CLIP-G; other widths, as in tiny test models: a projection makes it CLIP-G), never from its name.

The loaders build the transformers module empty on the meta device from a config read from the tensors' shapes and
assign the weights (`model_loader.build_without_weights` / `load_weights`). T5-XXL is special in two ways:
float16 overflows in it (its activations exceed 65504), so it computes in bfloat16 (or float32) whatever dtype is
asked; and its float8 files (`float8_e4m3fn`/`e5m2`, also ComfyUI's "scaled" ones with a `scale_weight` per
matrix) stay in float8 in memory, each block's weights cast up to the compute dtype for that block's forward only
(`Float8Compute`), so the 4.9 GB file costs 4.9 GB, not 9.5.
"""
from __future__ import annotations

import logging
import re

import torch

from backend.core.errors import UserError
from backend.engine.model_detection import describe_unknown, detect_text_encoder
from backend.engine.model_loader import build_text_encoder, build_without_weights, check_fit, few_names, load_weights

log = logging.getLogger(__name__)

PARTS = ("vae", "clip_l", "clip_g", "t5xxl")
PART_NAMES = {"vae": "VAE", "clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder",
              "t5xxl": "T5-XXL text encoder"}
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280

# Prefixes one part may carry in a file of its own, longest first (ComfyUI's, the CompVis VAE's, diffusers folders').
_PART_PREFIXES = tuple(sorted((
    *(f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl")),
    *(f"text_encoders.{name}." for name in ("clip_l", "clip_g", "t5xxl")),
    "first_stage_model.", "vae.", "transformer.",
), key=len, reverse=True))
# Tensors that are no weights of the module: ComfyUI embeds the tokenizer (`spiece_model`) and marks scaled float8.
_NOT_WEIGHTS = ("spiece_model", "scaled_fp8", "logit_scale", "position_ids")
_T5_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
_CLIP_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")


def strip_part_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` without the prefix all its tensors share (ComfyUI's `text_encoders.t5xxl.transformer.`, `vae.`, ...)."""
    for prefix in _PART_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return strip_part_prefix({k[len(prefix):]: v for k, v in sd.items()})
    return sd


def _weights_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _NOT_WEIGHTS}


def _is_t5(sd) -> bool:
    return any(_T5_BLOCK.match(k) for k in sd) and ("shared.weight" in sd or "encoder.embed_tokens.weight" in sd)


def _clip_token_embedding(sd) -> torch.Tensor | None:
    for key in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"):
        if key in sd and any(_CLIP_LAYER.match(k) for k in sd):
            return sd[key]
    return None


def _is_vae(sd) -> bool:
    starts = lambda s: any(k.startswith(s) for k in sd)  # noqa: E731
    return (starts("encoder.down.") and starts("decoder.up.")) or \
        (starts("encoder.down_blocks.") and starts("decoder.up_blocks."))


def classify_part(sd: dict[str, torch.Tensor], name: str = "") -> str:
    """"vae", "clip_l", "clip_g" or "t5xxl" for a separate part's tensors; anything else a `UserError` saying what
    it looks like (`name`, the file's name, starts the message)."""
    sd = strip_part_prefix(_weights_only(sd))
    if _is_t5(sd):
        return "t5xxl"
    token_embedding = _clip_token_embedding(sd)
    if token_embedding is not None:
        width = int(token_embedding.shape[1])
        if width == CLIP_L_WIDTH:
            return "clip_l"
        if width == CLIP_G_WIDTH:
            return "clip_g"
        return "clip_g" if "text_projection.weight" in sd else "clip_l"
    if _is_vae(sd):
        return "vae"
    what = f"{name} is" if name else "This file is"
    if any(".transformer.resblocks." in k or k.startswith("transformer.resblocks.") for k in sd):
        raise UserError(f"{what} a CLIP text encoder in OpenCLIP's layout (transformer.resblocks.*); FLUX and SD3 "
                        "need it in the transformers layout (text_model.encoder.layers.*), as clip_l.safetensors / "
                        "clip_g.safetensors are distributed.")
    raise UserError(f"{what} not a VAE, CLIP-L, CLIP-G or T5-XXL text encoder: {describe_unknown(sd)}.")


def part_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A part's tensors as the loaders take them: shared prefix and non-weight entries removed."""
    return strip_part_prefix(_weights_only(sd))


# -- CLIP -----------------------------------------------------------------------------------------------------
def _clip_config(sd: dict[str, torch.Tensor], what: str) -> dict:
    prefix = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    if _clip_token_embedding(sd) is None:
        raise UserError(f"The {what} file has no CLIP text encoder layers (text_model.encoder.layers.*).")
    return detect_text_encoder(sd, prefix, "openai")


def load_clip_l(sd: dict[str, torch.Tensor], dtype: torch.dtype, device) -> torch.nn.Module:
    """A `CLIPTextModel` (OpenAI CLIP ViT-L/14's text tower, quick-GELU) from transformers-named tensors.

    A `text_projection.weight` (SD3's clip_l.safetensors has one) is not part of CLIPTextModel and is left out:
    FLUX and SD3 use CLIP-L's pooled output before the projection.
    """
    sd = {k: v for k, v in part_state_dict(sd).items() if k != "text_projection.weight"}
    config = _clip_config(sd, "CLIP-L")
    encoder = build_without_weights(build_text_encoder, config, "CLIPTextModel")
    load_weights(encoder, sd, "CLIP-L text encoder", dtype=dtype, device=device)
    return encoder


def load_clip_g(sd: dict[str, torch.Tensor], dtype: torch.dtype, device) -> torch.nn.Module:
    """A `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14's text tower, GELU, projection) from transformers names."""
    sd = part_state_dict(sd)
    config = _clip_config(sd, "CLIP-G")
    projection = sd.get("text_projection.weight")
    if projection is None:
        raise UserError("The CLIP-G text encoder file lacks text_projection.weight; SD3 needs the projected pooled "
                        "output. Use clip_g.safetensors as SD3 distributes it.")
    config.update(hidden_act="gelu", pad_token_id=0, projection_dim=int(projection.shape[0]))
    encoder = build_without_weights(build_text_encoder, config, "CLIPTextModelWithProjection")
    load_weights(encoder, sd, "CLIP-G text encoder", dtype=dtype, device=device)
    return encoder


# -- T5 -------------------------------------------------------------------------------------------------------
def t5_config(sd: dict[str, torch.Tensor]) -> dict:
    """`T5Config` kwargs of a T5 encoder read from its tensors (T5 v1.1: gated GELU; v1.0: ReLU)."""
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    bias = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    query = sd.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if shared is None or bias is None or query is None:
        missing = [n for n, t in (("shared.weight", shared), ("relative_attention_bias", bias), ("q.weight", query))
                   if t is None]
        raise UserError(f"The T5-XXL text encoder file is incomplete (no {', '.join(missing)}).")
    heads = int(bias.shape[1])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")]
    layers = 1 + max(int(m.group(1)) for m in map(_T5_BLOCK.match, sd) if m)
    return {
        "vocab_size": int(shared.shape[0]),
        "d_model": int(shared.shape[1]),
        "d_kv": int(query.shape[0]) // heads,
        "d_ff": int(wi.shape[0]),
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": int(bias.shape[0]),
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
    }


def t5_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype T5 computes in when `dtype` is asked: float32 stays, everything else is bfloat16 (float16
    overflows in T5; float8 is storage only)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def load_t5xxl(sd: dict[str, torch.Tensor], dtype: torch.dtype, device) -> torch.nn.Module:
    """A `T5EncoderModel` from transformers-named tensors (`t5xxl_fp16`, `t5xxl_fp8_e4m3fn`, ComfyUI prefixes).

    Weight matrices stored in float8 in the file stay float8 (with `dtype` float8 the others are stored so too);
    everything computes in `t5_compute_dtype(dtype)`: float8 matrices are cast up one block at a time
    (`Float8Compute`), the norms and position biases are kept in the compute dtype.
    """
    from transformers import T5Config, T5EncoderModel

    # a whole T5 (encoder-decoder, as google/t5-v1_1-xxl's own file) is used for its encoder only
    sd = {k: v for k, v in part_state_dict(sd).items() if not k.startswith(("decoder.", "lm_head."))}
    scales = {k[: -len("scale_weight")] + "weight": v for k, v in sd.items() if k.endswith(".scale_weight")}
    sd = {k: v for k, v in sd.items() if not k.endswith((".scale_weight", ".scale_input"))}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight (tied)
    config = t5_config(sd)
    compute = t5_compute_dtype(dtype)
    storage_f8 = dtype if dtype in FLOAT8_DTYPES else None

    model = build_without_weights(lambda: T5EncoderModel(T5Config(**config)))
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    check_fit(sd, expected, "T5-XXL text encoder")
    assigned = {}
    for key in list(sd):
        value = sd.pop(key)
        if value.dtype in FLOAT8_DTYPES and value.ndim == 2:
            target = value.dtype  # a float8 matrix stays float8
        elif storage_f8 is not None and value.ndim == 2 and not key.endswith("relative_attention_bias.weight"):
            target = storage_f8
        else:
            target = compute
        if value.dtype in FLOAT8_DTYPES and target not in FLOAT8_DTYPES:
            value = _dequantize(value, scales.pop(key, None), target)
        assigned[key] = value.to(device=device, dtype=target).contiguous()
    assigned["encoder.embed_tokens.weight"] = assigned["shared.weight"]
    model.load_state_dict(assigned, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied again (assign made two parameters)
    model.eval()
    model.requires_grad_(False)
    if any(p.dtype in FLOAT8_DTYPES for p in model.parameters()):
        Float8Compute.install(model, compute, {k: v.to(device) for k, v in scales.items()})
    return model


def _dequantize(value: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    value = value.to(dtype)
    return value * scale.to(dtype) if scale is not None else value


class Float8Compute:
    """Runs a module whose weights are stored in float8: for its forward, its float8 parameters are replaced by
    copies in the compute dtype (times their ComfyUI `scale_weight`, if any), then the float8 tensors are put back.

    Installed on each T5 block and on the token embedding, so at most one block's weights exist in the compute
    dtype at a time. The hooks are the only state kept.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, scales: dict[str, torch.Tensor]):
        self.dtype = dtype
        self.scales = scales  # parameter name (relative to `module`) -> scale
        self.stored: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_pre_hook(self.before),
                        module.register_forward_hook(self.after, always_call=True)]

    @classmethod
    def install(cls, model: torch.nn.Module, dtype: torch.dtype, scales: dict[str, torch.Tensor]) -> list:
        # the token embedding runs as encoder.embed_tokens (its weight is shared.weight, the same parameter)
        units = [("shared.", model.encoder.embed_tokens),
                 *((f"encoder.block.{i}.", block) for i, block in enumerate(model.encoder.block))]
        done = []
        for prefix, unit in units:
            own = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
            if any(p.dtype in FLOAT8_DTYPES for p in unit.parameters()):
                done.append(cls(unit, dtype, own))
        loose = [n for n, p in model.named_parameters() if p.dtype in FLOAT8_DTYPES
                 and not (n.startswith("shared.") or n.startswith("encoder.block."))]
        if loose:
            raise UserError(f"T5-XXL: float8 tensors outside its blocks are not supported ({few_names(loose)}).")
        return done

    def before(self, module, _args):
        for name, param in module.named_parameters():
            if param.dtype in FLOAT8_DTYPES:
                self.stored[name] = param.data
                param.data = _dequantize(param.data, self.scales.get(name), self.dtype)

    def after(self, module, _args, _output):
        for name, param in module.named_parameters():
            stored = self.stored.pop(name, None)
            if stored is not None:
                param.data = stored
