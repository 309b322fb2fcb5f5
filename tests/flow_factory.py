"""Tiny FLUX / SD3 models and files for the tests (each part of issue 15 adds its own builders here).

Plain module imported by tests (not a test file).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


# -- LoRA files for FLUX / SD3 (tests/test_flow_lora.py) ---------------------------------------------------
# Tiny diffusers transformers with random weights, and LoRA files for them in the layouts people share:
# kohya (BFL / SAI module names, fused qkv and linear1, alpha), diffusers/PEFT (`transformer.` + diffusers
# names, lora_A/lora_B), ComfyUI's PEFT with BFL names (`diffusion_model.`), XLabs (processor layers).
# Each writer returns the tensors it wrote, so a test computes the expected changes from them.

def lora_test_flux_transformer(seed: int = 0, *, layers: int = 1, single_layers: int = 1, guidance: bool = True):
    """A FluxTransformer2DModel with hidden size 16 (2 heads of 8), MLP 64, random weights, float32."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=24, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    with torch.no_grad():  # diffusers zero-initializes some layers; random values make every path count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def lora_test_sd3_transformer(seed: int = 0, *, layers: int = 2, dual_attention: bool = True):
    """An SD3Transformer2DModel with hidden size 16 (2 heads of 8), the last block context-pre-only, block 0
    with SD 3.5 Medium's second attention when `dual_attention`, random weights, float32."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16,
                                  dual_attention_layers=(0,) if dual_attention else (), qk_norm="rms_norm")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _out(module) -> int:
    return int(getattr(module, "out_features", None) or module.weight.shape[0])


def _in(module) -> int:
    return int(getattr(module, "in_features", None) or module.weight.shape[1])


def flux_bfl_shapes(transformer) -> dict[str, tuple[int, int]]:
    """{BFL module name: (out, in)} of the layers LoRAs train, from the diffusers modules' sizes."""
    t = transformer
    shapes = {"img_in": (_out(t.x_embedder), _in(t.x_embedder)), "txt_in": (_out(t.context_embedder), _in(t.context_embedder)),
              "final_layer.linear": (_out(t.proj_out), _in(t.proj_out)),
              "final_layer.adaLN_modulation.1": (_out(t.norm_out.linear), _in(t.norm_out.linear))}
    for i, b in enumerate(t.transformer_blocks):
        d = f"double_blocks.{i}"
        a = b.attn
        shapes[f"{d}.img_attn.qkv"] = (_out(a.to_q) + _out(a.to_k) + _out(a.to_v), _in(a.to_q))
        shapes[f"{d}.txt_attn.qkv"] = (_out(a.add_q_proj) + _out(a.add_k_proj) + _out(a.add_v_proj), _in(a.add_q_proj))
        shapes[f"{d}.img_attn.proj"] = (_out(a.to_out[0]), _in(a.to_out[0]))
        shapes[f"{d}.txt_attn.proj"] = (_out(a.to_add_out), _in(a.to_add_out))
        shapes[f"{d}.img_mlp.0"] = (_out(b.ff.net[0].proj), _in(b.ff.net[0].proj))
        shapes[f"{d}.img_mlp.2"] = (_out(b.ff.net[2]), _in(b.ff.net[2]))
        shapes[f"{d}.txt_mlp.0"] = (_out(b.ff_context.net[0].proj), _in(b.ff_context.net[0].proj))
        shapes[f"{d}.txt_mlp.2"] = (_out(b.ff_context.net[2]), _in(b.ff_context.net[2]))
        shapes[f"{d}.img_mod.lin"] = (_out(b.norm1.linear), _in(b.norm1.linear))
        shapes[f"{d}.txt_mod.lin"] = (_out(b.norm1_context.linear), _in(b.norm1_context.linear))
    for i, b in enumerate(t.single_transformer_blocks):
        s = f"single_blocks.{i}"
        a = b.attn
        shapes[f"{s}.linear1"] = (_out(a.to_q) + _out(a.to_k) + _out(a.to_v) + _out(b.proj_mlp), _in(a.to_q))
        shapes[f"{s}.linear2"] = (_out(b.proj_out), _in(b.proj_out))
        shapes[f"{s}.modulation.lin"] = (_out(b.norm.linear), _in(b.norm.linear))
    return shapes


def sd3_sai_shapes(transformer) -> dict[str, tuple[int, ...]]:
    """{SAI module name: weight shape} of the layers LoRAs train."""
    t = transformer
    shapes = {"context_embedder": (_out(t.context_embedder), _in(t.context_embedder)),
              "final_layer.linear": (_out(t.proj_out), _in(t.proj_out)),
              "final_layer.adaLN_modulation.1": (_out(t.norm_out.linear), _in(t.norm_out.linear)),
              "x_embedder.proj": tuple(t.pos_embed.proj.weight.shape)}
    for i, b in enumerate(t.transformer_blocks):
        j = f"joint_blocks.{i}"
        a = b.attn
        shapes[f"{j}.x_block.attn.qkv"] = (_out(a.to_q) * 3, _in(a.to_q))
        shapes[f"{j}.x_block.attn.proj"] = (_out(a.to_out[0]), _in(a.to_out[0]))
        if getattr(b, "attn2", None) is not None:
            shapes[f"{j}.x_block.attn2.qkv"] = (_out(b.attn2.to_q) * 3, _in(b.attn2.to_q))
            shapes[f"{j}.x_block.attn2.proj"] = (_out(b.attn2.to_out[0]), _in(b.attn2.to_out[0]))
        shapes[f"{j}.x_block.mlp.fc1"] = (_out(b.ff.net[0].proj), _in(b.ff.net[0].proj))
        shapes[f"{j}.x_block.mlp.fc2"] = (_out(b.ff.net[2]), _in(b.ff.net[2]))
        shapes[f"{j}.x_block.adaLN_modulation.1"] = (_out(b.norm1.linear), _in(b.norm1.linear))
        shapes[f"{j}.context_block.attn.qkv"] = (_out(a.add_q_proj) * 3, _in(a.add_q_proj))
        shapes[f"{j}.context_block.adaLN_modulation.1"] = (_out(b.norm1_context.linear), _in(b.norm1_context.linear))
        if not b.context_pre_only:
            shapes[f"{j}.context_block.attn.proj"] = (_out(a.to_add_out), _in(a.to_add_out))
            shapes[f"{j}.context_block.mlp.fc1"] = (_out(b.ff_context.net[0].proj), _in(b.ff_context.net[0].proj))
            shapes[f"{j}.context_block.mlp.fc2"] = (_out(b.ff_context.net[2]), _in(b.ff_context.net[2]))
    return shapes


def _pair(gen: torch.Generator, shape: tuple, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]) for a weight of `shape`."""
    kernel = tuple(shape[2:])
    down = torch.randn((rank, shape[1], *kernel), generator=gen) * 0.3
    up = torch.randn((shape[0], rank, *([1] * len(kernel))), generator=gen) * 0.3
    return down.contiguous(), up.contiguous()


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return tensors


def _clip_l_kohya(gen: torch.Generator, clip_l, rank: int, alpha: float | None, prefix: str) -> dict:
    """A kohya LoRA for the q/v projections and fc1 of CLIP-L's layers (`lora_te1_text_model_encoder_...`)."""
    out = {}
    for name, module in clip_l.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")):
            full = name if name.startswith("text_model.") else "text_model." + name  # transformers 5 dropped it
            key = prefix + full.replace(".", "_")
            down, up = _pair(gen, tuple(module.weight.shape), rank)
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def write_flux_lora_kohya(path: Path, transformer, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                          clip_l=None, t5_keys: bool = False, extra: dict | None = None,
                          metadata: dict | None = None) -> dict:
    """kohya's FLUX LoRA (sd-scripts `lora_flux`): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
    `.lora_up.weight`, `.alpha`, for every layer `flux_bfl_shapes` lists; with `clip_l`, CLIP-L modules
    (`lora_te1_...`); with `t5_keys`, one T5 module (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for bfl, shape in flux_bfl_shapes(transformer).items():
        key = "lora_unet_" + bfl.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _pair(gen, shape, rank)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    if clip_l is not None:
        out.update(_clip_l_kohya(gen, clip_l, rank, alpha, "lora_te1_"))
    if t5_keys:
        out["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.randn(rank, 32, generator=gen)
        out["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.randn(32, rank, generator=gen)
    out.update(extra or {})
    return _save(path, out, metadata)


def write_flux_lora_peft(path: Path, transformer, *, rank: int = 4, seed: int = 0, names: str = "diffusers",
                         prefix: str | None = None, alpha: float | None = None) -> dict:
    """A PEFT-style FLUX LoRA (`lora_A.weight` / `lora_B.weight`, scale 1 without `alpha`).

    names="diffusers": every Linear of the blocks under diffusers' names, prefix "transformer." (diffusers,
    ai-toolkit; "base_model.model." is PEFT's own); names="bfl": the BFL layers, prefix "diffusion_model."
    (ComfyUI's saves)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if names == "diffusers":
        prefix = "transformer." if prefix is None else prefix
        layers = {n: tuple(m.weight.shape) for n, m in transformer.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    else:
        prefix = "diffusion_model." if prefix is None else prefix
        layers = flux_bfl_shapes(transformer)
    for name, shape in layers.items():
        down, up = _pair(gen, shape, rank)
        out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = down, up
        if alpha is not None:
            out[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return _save(path, out)


def write_flux_lora_xlabs(path: Path, transformer, *, rank: int = 4, seed: int = 0) -> dict:
    """XLabs' FLUX LoRA: `double_blocks.0.processor.qkv_lora1.down.weight` (image stream), `proj_lora1`,
    `qkv_lora2` / `proj_lora2` (text stream); single blocks `qkv_lora` (3 x hidden rows) and `proj_lora`
    (linear2's input)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = flux_bfl_shapes(transformer)
    hidden = transformer.x_embedder.out_features
    out = {}
    for i, _ in enumerate(transformer.transformer_blocks):
        for layer, bfl in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                           ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            down, up = _pair(gen, shapes[f"double_blocks.{i}.{bfl}"], rank)
            out[f"double_blocks.{i}.processor.{layer}.down.weight"] = down
            out[f"double_blocks.{i}.processor.{layer}.up.weight"] = up
    for i, _ in enumerate(transformer.single_transformer_blocks):
        for layer, shape in (("qkv_lora", (3 * hidden, hidden)), ("proj_lora", shapes[f"single_blocks.{i}.linear2"])):
            down, up = _pair(gen, shape, rank)
            out[f"single_blocks.{i}.processor.{layer}.down.weight"] = down
            out[f"single_blocks.{i}.processor.{layer}.up.weight"] = up
    return _save(path, out)


def write_sd3_lora(path: Path, transformer, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                   fmt: str = "kohya", metadata: dict | None = None) -> dict:
    """An SD3 LoRA. fmt="kohya": sd-scripts' `lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`
    (+ alpha) for every layer `sd3_sai_shapes` lists (the patch embedding's conv too); fmt="peft":
    `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` for every Linear of the blocks."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if fmt == "kohya":
        for sai, shape in sd3_sai_shapes(transformer).items():
            key = "lora_unet_" + sai.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _pair(gen, shape, rank)
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    else:
        for name, m in transformer.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks."):
                down, up = _pair(gen, tuple(m.weight.shape), rank)
                out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = down, up
    return _save(path, out, metadata)


class Float8Linear(torch.nn.Module):
    """A stand-in for the FLUX loader's `QuantizedLinear` (same duck type: in_features, out_features, bias,
    dequantized_weight(dtype)): the weight stored as float8_e4m3fn, dequantized in the forward."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class CastLinear(torch.nn.Linear):
    """An nn.Linear whose weight may be stored in float8, cast to the input's dtype in the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_blocks(transformer, *, kind: str = "quantized") -> list[str]:
    """Store the blocks' Linear weights as float8: kind="quantized" swaps them for `Float8Linear`,
    kind="float8" keeps nn.Linear (`CastLinear`) with a float8 weight. The names changed."""
    changed = []
    for name, module in list(transformer.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        parent = transformer.get_submodule(name.rsplit(".", 1)[0])
        if kind == "quantized":
            new = Float8Linear(module)
        else:
            new = CastLinear(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight = torch.nn.Parameter(module.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
            if module.bias is not None:
                new.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[1], new)
        changed.append(name)
    return changed
