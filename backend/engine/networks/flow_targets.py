"""Where FLUX and SD3 LoRA modules land on the diffusers transformers (`FluxTransformer2DModel`,
`SD3Transformer2DModel`).

LoRA files for these models name their modules three ways:
- diffusers' own module names (`transformer.transformer_blocks.0.attn.to_q`, PEFT `lora_A`/`lora_B`,
  kohya's `lora_transformer_...`): these are the loaded modules themselves, found by `lora_apply.target_table`;
- the original checkpoints' names: Black Forest Labs' for FLUX (kohya `lora_unet_double_blocks_0_img_attn_qkv`,
  ComfyUI's `diffusion_model.double_blocks.0.img_attn.qkv.lora_A`, XLabs' processors, see `lora_files`),
  Stability's for SD3 (`lora_unet_joint_blocks_0_x_block_attn_qkv`);
- for the text encoders, the transformers names under te1/te2/te3 (see `flow_text_encoders`).

The original layouts fuse some layers the diffusers modules keep apart: FLUX's `img_attn.qkv` is to_q, to_k
and to_v stacked by rows, a single block's `linear1` is to_q, to_k, to_v and proj_mlp; SD3's `attn.qkv` the
same; and the final modulation (`final_layer.adaLN_modulation.1`, SD3's last context block's) has its two
halves (shift, scale) in the other order than diffusers' (scale, shift). A `FusedTarget` describes such a
layer: the diffusers modules and which rows of the fused layer's weight each one holds. A LoRA on it is
computed at the fused shape, then split by rows: for a plain LoRA every module gets its rows of `up` and
the whole (shared) `down`.

`flux_targets(transformer)` / `sd3_targets(transformer)` give {name with "_" for ".": module or FusedTarget}
under the original names; `flow_family(names)` tells from a file's module names which family it was made for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.engine.families.flux import BFL_DOUBLE_RENAMES, BFL_RENAMES, BFL_SINGLE_RENAMES


@dataclass(eq=False)
class FusedTarget:
    """A layer of the original checkpoint held by several diffusers modules: `pieces` = (module, rows), where
    `rows` (a slice, or a LongTensor of row indices) picks the fused weight's rows that make that module's
    weight, in its order."""

    pieces: list[tuple[torch.nn.Module, slice | torch.Tensor]]
    rows: int  # rows of the fused weight


def _get(root: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def _out_rows(module: torch.nn.Module) -> int:
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.weight.shape[0])


def _stacked(root: torch.nn.Module, names: list[str]) -> FusedTarget | None:
    """The modules `names` stacked by rows in this order (qkv, linear1); None when one is missing."""
    modules = [_get(root, n) for n in names]
    if any(m is None for m in modules):
        return None
    pieces, start = [], 0
    for m in modules:
        rows = _out_rows(m)
        pieces.append((m, slice(start, start + rows)))
        start += rows
    return FusedTarget(pieces, start)


def _halves_swapped(root: torch.nn.Module, name: str) -> FusedTarget | None:
    """A modulation layer whose two halves are in the other order in the original checkpoint."""
    m = _get(root, name)
    if m is None:
        return None
    rows = _out_rows(m)
    half = rows // 2
    order = torch.cat([torch.arange(half, rows), torch.arange(0, half)])
    return FusedTarget([(m, order)], rows)


def _add(table: dict, name: str, target) -> None:
    if target is not None:
        table[name.replace(".", "_")] = target


def flux_targets(transformer: torch.nn.Module) -> dict[str, object]:
    """{BFL module name with "_": module or FusedTarget} for a diffusers `FluxTransformer2DModel`."""
    t = transformer
    table: dict[str, object] = {}
    for bfl, ours in BFL_RENAMES:  # the loader's own table of the 1:1 modules (guidance_in: FLUX dev only)
        _add(table, bfl, _get(t, ours))
    _add(table, "final_layer.adaLN_modulation.1", _halves_swapped(t, "norm_out.linear"))
    for i, _ in enumerate(getattr(t, "transformer_blocks", [])):
        ours = f"transformer_blocks.{i}"
        bfl = f"double_blocks.{i}"
        _add(table, f"{bfl}.img_attn.qkv", _stacked(t, [f"{ours}.attn.to_q", f"{ours}.attn.to_k", f"{ours}.attn.to_v"]))
        _add(table, f"{bfl}.txt_attn.qkv",
             _stacked(t, [f"{ours}.attn.add_q_proj", f"{ours}.attn.add_k_proj", f"{ours}.attn.add_v_proj"]))
        for b, o in BFL_DOUBLE_RENAMES:
            _add(table, f"{bfl}.{b}", _get(t, f"{ours}.{o}"))
    for i, _ in enumerate(getattr(t, "single_transformer_blocks", [])):
        ours = f"single_transformer_blocks.{i}"
        bfl = f"single_blocks.{i}"
        qkv = [f"{ours}.attn.to_q", f"{ours}.attn.to_k", f"{ours}.attn.to_v"]
        _add(table, f"{bfl}.linear1", _stacked(t, qkv + [f"{ours}.proj_mlp"]))
        _add(table, f"{bfl}.attn_qkv", _stacked(t, qkv))  # XLabs' single-block qkv_lora
        for b, o in BFL_SINGLE_RENAMES:  # modulation.lin, linear2
            _add(table, f"{bfl}.{b}", _get(t, f"{ours}.{o}"))
    return table


def sd3_targets(transformer: torch.nn.Module) -> dict[str, object]:
    """{SAI module name with "_": module or FusedTarget} for a diffusers `SD3Transformer2DModel`."""
    t = transformer
    table: dict[str, object] = {}
    for sai, ours in (("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
                      ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                      ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                      ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                      ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                      ("final_layer.linear", "proj_out")):
        _add(table, sai, _get(t, ours))
    _add(table, "final_layer.adaLN_modulation.1", _halves_swapped(t, "norm_out.linear"))
    for i, block in enumerate(getattr(t, "transformer_blocks", [])):
        ours = f"transformer_blocks.{i}"
        sai = f"joint_blocks.{i}"
        for attn, sai_attn in (("attn", "attn"), ("attn2", "attn2")):
            _add(table, f"{sai}.x_block.{sai_attn}.qkv",
                 _stacked(t, [f"{ours}.{attn}.to_q", f"{ours}.{attn}.to_k", f"{ours}.{attn}.to_v"]))
            _add(table, f"{sai}.x_block.{sai_attn}.proj", _get(t, f"{ours}.{attn}.to_out.0"))
        _add(table, f"{sai}.context_block.attn.qkv",
             _stacked(t, [f"{ours}.attn.add_q_proj", f"{ours}.attn.add_k_proj", f"{ours}.attn.add_v_proj"]))
        for s, o in (("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
                     ("x_block.adaLN_modulation.1", "norm1.linear"), ("context_block.attn.proj", "attn.to_add_out"),
                     ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2")):
            _add(table, f"{sai}.{s}", _get(t, f"{ours}.{o}"))
        # The last block's context stream only conditions the image stream (diffusers: AdaLayerNormContinuous,
        # scale before shift); the others' modulation keeps the checkpoint's order.
        if getattr(block, "context_pre_only", False):
            _add(table, f"{sai}.context_block.adaLN_modulation.1", _halves_swapped(t, f"{ours}.norm1_context.linear"))
        else:
            _add(table, f"{sai}.context_block.adaLN_modulation.1", _get(t, f"{ours}.norm1_context.linear"))
    return table


# Which text encoder a LoRA part means, per family. kohya: lora_te1_ CLIP-L, lora_te2_ CLIP-G, lora_te3_ T5;
# diffusers: text_encoder. CLIP-L, text_encoder_2. CLIP-G (SD3) or T5 (FLUX, which has no CLIP-G), text_encoder_3. T5.
FLOW_TEXT_ENCODER_PARTS = {
    "flux": {"te1": "clip_l", "te2": "t5xxl", "te3": "t5xxl"},
    "sd3": {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"},
}


def flow_text_encoders(family: str, text_encoders: dict) -> dict[str, torch.nn.Module]:
    """{part: text encoder module} of a FLUX/SD3 model (only the encoders it has loaded)."""
    parts = FLOW_TEXT_ENCODER_PARTS.get(family, {})
    return {part: text_encoders[key] for part, key in parts.items() if text_encoders.get(key) is not None}


_FLUX_MARKS = ("double_blocks_", "single_blocks_", "single_transformer_blocks_")
_SD3_MARKS = ("joint_blocks_",)


def flow_family(unet_names) -> str | None:
    """"flux" / "sd3" when a file's denoiser module names (with "_") are those of one of them, "flow" when they
    are diffusers transformer names both share (`transformer_blocks_N_...`), None for other (UNet) names."""
    names = list(unet_names)
    if any(n.startswith(_FLUX_MARKS) for n in names):
        return "flux"
    if any(n.startswith(_SD3_MARKS) for n in names):
        return "sd3"
    if any(n.startswith("transformer_blocks_") and "_attn2_" in n for n in names):
        return "sd3"  # SD 3.5 Medium's second image attention
    if any(n.startswith(("transformer_blocks_", "context_embedder", "x_embedder", "time_text_embed_")) for n in names):
        return "flow"
    return None
