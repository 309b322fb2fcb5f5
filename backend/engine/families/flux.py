"""FLUX.1 transformers: detection, config from tensor shapes, loading into diffusers' FluxTransformer2DModel.

Files come in Black Forest Labs' layout (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1`,
`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in` for dev, `final_layer`), alone or inside an
all-in-one checkpoint under `model.diffusion_model.` (ComfyUI/Forge) or `diffusion_model.`; as bf16/fp16,
float8, or GGUF (city96's files keep BFL names). A transformer saved by diffusers
(`transformer_blocks.N.*`, `single_transformer_blocks.N.*`) is accepted as well.

The config is read from the shapes (never from the network); the BFL names are renamed to diffusers' with
fused projections split by rows (q/k/v of `qkv`; q/k/v/mlp of `linear1`), which works on float8 and on
GGUF blocks alike (quantization blocks run along the input dimension). Quantized linear weights stay
quantized in `QuantizedLinear`s (see `quantized`); everything else is cast to the requested dtype.
"""
from __future__ import annotations

import re

import torch

from backend.core.errors import UserError
from backend.engine.families.quantized import (SCALE_SUFFIXES, SCALED_FP8_MARKER, cat_rows, load_quantized_weights,
                                               read_nf4_weights, split_rows)

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("transformer.",)
MLP_RATIO = 4  # diffusers' FluxTransformer2DModel has it fixed

_BFL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight")
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.proj_mlp.weight",
                      "x_embedder.weight")


def _strip(keys, prefixes) -> dict[str, str]:
    """{bare name: original key} for the keys under the first prefix that has any (or no prefix)."""
    keys = list(keys)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return {k: k for k in keys}


def _layout(keys) -> tuple[str, dict[str, str]] | tuple[None, None]:
    """("bfl"|"diffusers", {bare name: key}) for the FLUX transformer in `keys`, or (None, None)."""
    bare = _strip(keys, TRANSFORMER_PREFIXES)
    if all(m in bare for m in _BFL_MARKERS):
        return "bfl", bare
    bare = _strip(keys, DIFFUSERS_PREFIXES)
    if all(m in bare for m in _DIFFUSERS_MARKERS):
        return "diffusers", bare
    return None, None


def is_flux(keys) -> bool:
    """Whether the names hold a FLUX.1 transformer (BFL layout, with or without a checkpoint prefix, or diffusers')."""
    return _layout(keys)[0] is not None


def transformer_state_dict(state_dict: dict) -> tuple[str, dict]:
    """The FLUX transformer's tensors of `state_dict` without prefix, and their layout ("bfl"/"diffusers")."""
    layout, bare = _layout(state_dict.keys())
    if layout is None:
        raise UserError("The file does not hold a FLUX.1 transformer (no double_blocks/single_blocks/img_in "
                        "tensors in Black Forest Labs' layout, nor diffusers' transformer_blocks).")
    if layout == "bfl" and any(name.startswith("distilled_guidance_layer.") for name in bare):
        raise UserError("This is a Chroma model (derived from FLUX.1 with its own modulation network, no "
                        "vector_in/img_mod layers), which Easel does not support.")
    return layout, {name: state_dict[key] for name, key in bare.items()}


def _count_blocks(names, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise UserError(f"The FLUX transformer lacks {prefix}{missing[0]} (of {max(indices) + 1} blocks): "
                        "the file is damaged or incomplete.")
    return max(indices) + 1


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary embedding's split of a head over (index, row, column): FLUX.1's (16, 56, 56) for 128,
    the same proportions (even sizes) for other head sizes."""
    first = 2 * round(head_dim / 16)
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


def _shape(sd: dict, name: str) -> tuple:
    if name not in sd:
        raise UserError(f"The FLUX transformer lacks {name}: the file is damaged or incomplete.")
    return tuple(sd[name].shape)


def _config(layout: str, sd: dict) -> dict:
    if layout == "bfl":
        names = {"x": "img_in.weight", "out": "final_layer.linear.weight", "txt": "txt_in.weight",
                 "vec": "vector_in.in_layer.weight", "head": "double_blocks.0.img_attn.norm.query_norm.scale",
                 "mlp": "double_blocks.0.img_mlp.0.weight"}
        layers, single = _count_blocks(sd, "double_blocks."), _count_blocks(sd, "single_blocks.")
        guidance = "guidance_in.in_layer.weight" in sd
    else:
        names = {"x": "x_embedder.weight", "out": "proj_out.weight", "txt": "context_embedder.weight",
                 "vec": "time_text_embed.text_embedder.linear_1.weight", "head": "transformer_blocks.0.attn.norm_q.weight",
                 "mlp": "transformer_blocks.0.ff.net.0.proj.weight"}
        layers, single = _count_blocks(sd, "transformer_blocks."), _count_blocks(sd, "single_transformer_blocks.")
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    inner, in_channels = _shape(sd, names["x"])
    head_dim = _shape(sd, names["head"])[0]
    if inner % head_dim:
        raise UserError(f"The FLUX transformer's width {inner} is not a multiple of its head size {head_dim}.")
    if _shape(sd, names["mlp"])[0] != MLP_RATIO * inner:
        raise UserError(f"The FLUX transformer's MLP width {_shape(sd, names['mlp'])[0]} is not {MLP_RATIO}x its "
                        f"width {inner}: an unsupported variant.")
    if single == 0:
        raise UserError("The FLUX transformer has no single-stream blocks: the file is damaged or incomplete.")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": _shape(sd, names["out"])[0],
        "num_layers": layers,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(sd, names["txt"])[1],
        "pooled_projection_dim": _shape(sd, names["vec"])[1],
        "guidance_embeds": guidance,
        "axes_dims_rope": rope_axes(head_dim),
    }


def flux_config(state_dict: dict) -> dict:
    """`FluxTransformer2DModel` kwargs read from the tensors' shapes (BFL or diffusers names, prefixes allowed)."""
    layout, sd = transformer_state_dict(state_dict)
    return _config(layout, sd)


def flux_variant(config: dict) -> str:
    """"flux-dev" (distilled guidance input) or "flux-schnell"."""
    return "flux-dev" if config["guidance_embeds"] else "flux-schnell"


# -- BFL -> diffusers names ------------------------------------------------------------------------
BFL_RENAMES = [  # (BFL module, diffusers module) for the 1:1 modules
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
BFL_DOUBLE_RENAMES = [
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
]
BFL_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
BFL_SINGLE_RENAMES = [("modulation.lin", "norm.linear"), ("linear2", "proj_out")]
BFL_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


class BflRenamer:
    """Moves tensors from Black Forest Labs' names (`sd`, consumed) to diffusers' (`out`), the fused projections split
    by rows (plain, float8 or GGUF weights alike), a scaled-fp8 scale (`scales`) following each piece; a tensor that
    is not there is a `UserError` naming `what` (the FLUX transformer, an XLabs ControlNet)."""

    def __init__(self, sd: dict, what: str, scales: dict | None = None):
        self.sd, self.what, self.scales = sd, what, scales or {}
        self.out: dict = {}

    def pop(self, key: str):
        if key not in self.sd:
            raise UserError(f"The {self.what} lacks {key}: the file is damaged or incomplete.")
        return self.sd.pop(key)

    def move(self, src: str, dst: str) -> None:
        self.out[dst] = self.pop(src)

    def follow_scales(self, src: str, dst: str) -> None:
        for suffix in SCALE_SUFFIXES:
            if f"{src}{suffix}" in self.scales:
                self.out[f"{dst}{suffix}"] = self.scales[f"{src}{suffix}"]

    def move_module(self, src: str, dst: str) -> None:
        self.move(f"{src}.weight", f"{dst}.weight")
        self.move(f"{src}.bias", f"{dst}.bias")
        self.follow_scales(src, dst)

    def split(self, src: str, dsts: list[str], sizes: list[int]) -> None:
        for suffix in ("weight", "bias"):
            for dst, piece in zip(dsts, split_rows(self.pop(f"{src}.{suffix}"), sizes)):
                self.out[f"{dst}.{suffix}"] = piece
        for dst in dsts:
            self.follow_scales(src, dst)

    def double_block(self, i: int, inner: int) -> None:
        """Double block `i`: its 1:1 modules, q/k norms and the two fused qkv projections."""
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for src, dst in BFL_DOUBLE_RENAMES:
            self.move_module(b + src, d + dst)
        for src, dst in BFL_DOUBLE_NORMS:
            self.move(b + src, d + dst)
        self.split(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], [inner] * 3)
        self.split(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                   [inner] * 3)


def bfl_to_diffusers(sd: dict, config: dict) -> dict:
    """Rename a BFL-layout FLUX transformer (no prefix) to diffusers' names, splitting the fused projections
    by rows (tensors, float8 or GGUF weights alike; a scaled-fp8 `scale_weight` goes with each piece).
    Leftover names give a `UserError`."""
    sd = {k: v for k, v in sd.items() if k != SCALED_FP8_MARKER}
    scales = {k: sd.pop(k) for k in [k for k in sd if k.endswith(SCALE_SUFFIXES)]}
    r = BflRenamer(sd, "FLUX transformer", scales)
    inner = config["attention_head_dim"] * config["num_attention_heads"]
    for src, dst in BFL_RENAMES:
        if src.startswith("guidance_in") and not config["guidance_embeds"]:
            continue
        r.move_module(src, dst)
    for suffix in ("weight", "bias"):  # BFL's final modulation is (shift, scale); diffusers' (scale, shift)
        shift, scale = split_rows(r.pop(f"final_layer.adaLN_modulation.1.{suffix}"), [inner, inner])
        r.out[f"norm_out.linear.{suffix}"] = cat_rows([scale, shift])
    r.follow_scales("final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in range(config["num_layers"]):
        r.double_block(i, inner)
    for i in range(config["num_single_layers"]):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for src, dst in BFL_SINGLE_RENAMES:
            r.move_module(b + src, d + dst)
        for src, dst in BFL_SINGLE_NORMS:
            r.move(b + src, d + dst)
        r.split(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
                [inner, inner, inner, MLP_RATIO * inner])
    used = {f"{m}{suffix}" for m in _source_modules(config) for suffix in SCALE_SUFFIXES}
    sd.update({k: v for k, v in scales.items() if k not in used})
    if sd:
        from backend.engine.model_loader import few_names
        raise UserError(f"The FLUX transformer holds {len(sd)} tensors of no known part: {few_names(sd)}. "
                        "The file may be of an unsupported variant.")
    return r.out


def _source_modules(config: dict) -> list[str]:
    """The BFL module names of a FLUX transformer with `config` (those a scale may belong to)."""
    names = [src for src, _ in BFL_RENAMES] + ["final_layer.adaLN_modulation.1"]
    for i in range(config["num_layers"]):
        names += [f"double_blocks.{i}.{src}" for src, _ in BFL_DOUBLE_RENAMES]
        names += [f"double_blocks.{i}.img_attn.qkv", f"double_blocks.{i}.txt_attn.qkv"]
    for i in range(config["num_single_layers"]):
        names += [f"single_blocks.{i}.{src}" for src, _ in BFL_SINGLE_RENAMES] + [f"single_blocks.{i}.linear1"]
    return names


def build_flux_transformer(config: dict):
    """An empty `FluxTransformer2DModel` (parameters on the meta device) for `config`."""
    from diffusers import FluxTransformer2DModel

    from backend.engine.model_loader import build_without_weights
    return build_without_weights(lambda: FluxTransformer2DModel(**config))


def load_flux_transformer(state_dict: dict, *, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A diffusers `FluxTransformer2DModel` from FLUX transformer tensors (BFL or diffusers names, prefixes
    allowed; plain, float8 or GGUF weights). Float8 and GGUF linear weights stay stored as they are
    (`QuantizedLinear`, computed in the input's dtype); the rest is cast to `dtype` on `device`."""
    state_dict = read_nf4_weights(state_dict, "This FLUX model")  # Forge's bnb-nf4 files: NF4Weight
    layout, sd = transformer_state_dict(state_dict)
    config = _config(layout, sd)
    if layout == "bfl":
        sd = bfl_to_diffusers(sd, config)
    model = build_flux_transformer(config)
    load_quantized_weights(model, sd, "FLUX transformer", dtype=dtype, device=device)
    return model
