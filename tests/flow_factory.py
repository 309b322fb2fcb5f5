"""Tiny FLUX.1 / SD3 model files with the real architectures, written in the layouts people share.

Plain module imported by tests (not a test file).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- FLUX.1 transformer ------------------------------------------------------------------------------
# 2 heads of 32 (rope axes 4+14+14), 1 double + 1 single block, FLUX's 64 input channels (16 latent
# channels in 2x2 patches), T5 width 32, CLIP pooled width 16.
def tiny_flux_config(guidance: bool = True) -> dict:
    return {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 1, "num_single_layers": 1,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
            "pooled_projection_dim": 16, "guidance_embeds": guidance, "axes_dims_rope": (4, 14, 14)}


def build_tiny_flux(guidance: bool = True, seed: int = 0):
    """A diffusers FluxTransformer2DModel of `tiny_flux_config` with seeded random float32 weights."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**tiny_flux_config(guidance))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # large enough that every layer matters, small enough that activations stay moderate
                fan_in = p.shape[1] if p.ndim == 2 else 16
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in ** 0.5))
    return model.eval()


def diffusers_to_bfl(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The Black Forest Labs names of a diffusers FLUX state dict (fused qkv / linear1, (shift, scale) order)."""
    sd = dict(sd)
    out = {}
    inner = config["attention_head_dim"] * config["num_attention_heads"]

    def mod(dst, src):
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd.pop(f"{src}.{s}")

    def fuse(dst, srcs):
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = torch.cat([sd.pop(f"{src}.{s}") for src in srcs])

    mod("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    mod("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    mod("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    mod("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if config["guidance_embeds"]:
        mod("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        mod("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    mod("txt_in", "context_embedder")
    mod("img_in", "x_embedder")
    mod("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{s}").split(inner)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for i in range(config["num_layers"]):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        mod(b + "img_mod.lin", d + "norm1.linear")
        mod(b + "txt_mod.lin", d + "norm1_context.linear")
        fuse(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        fuse(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        out[b + "img_attn.norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[b + "img_attn.norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
        out[b + "txt_attn.norm.query_norm.scale"] = sd.pop(d + "attn.norm_added_q.weight")
        out[b + "txt_attn.norm.key_norm.scale"] = sd.pop(d + "attn.norm_added_k.weight")
        mod(b + "img_attn.proj", d + "attn.to_out.0")
        mod(b + "txt_attn.proj", d + "attn.to_add_out")
        mod(b + "img_mlp.0", d + "ff.net.0.proj")
        mod(b + "img_mlp.2", d + "ff.net.2")
        mod(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        mod(b + "txt_mlp.2", d + "ff_context.net.2")
    for i in range(config["num_single_layers"]):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        mod(b + "modulation.lin", d + "norm.linear")
        fuse(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        out[b + "norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
        mod(b + "linear2", d + "proj_out")
    assert not sd, f"unmapped diffusers tensors: {sorted(sd)}"
    return out


def tiny_flux_bfl(guidance: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny FLUX transformer's float32 tensors by BFL name (no prefix)."""
    return diffusers_to_bfl(build_tiny_flux(guidance, seed).state_dict(), tiny_flux_config(guidance))


def write_flux_bfl(path: Path, *, guidance: bool = True, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                   seed: int = 0) -> Path:
    """The tiny FLUX transformer as a BFL-layout .safetensors (`prefix` e.g. "model.diffusion_model."), every
    tensor stored as `dtype` (bfloat16, float16, float32, float8_e4m3fn/e5m2: float8 files store all of them so)."""
    from safetensors.torch import save_file
    sd = {prefix + k: v.to(dtype).contiguous() for k, v in tiny_flux_bfl(guidance, seed).items()}
    path = Path(path)
    save_file(sd, str(path))
    return path


def scaled_fp8_bfl(guidance: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny FLUX transformer as ComfyUI's "scaled" float8 files store it: each 2-D weight divided by a
    per-tensor `scale_weight` (absmax / 448) and stored as float8_e4m3fn, `scale_input` beside it, 1-D
    tensors in bfloat16, and the `scaled_fp8` marker tensor."""
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in tiny_flux_bfl(guidance, seed).items():
        if tensor.ndim == 2:
            module = name[: -len(".weight")]
            scale = tensor.abs().max() / 448
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[module + ".scale_weight"] = scale.reshape(())
            out[module + ".scale_input"] = torch.ones(())
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


def random_kquant_rows(rows: int, cols: int, qtype, seed: int = 0):
    """Random but valid raw blocks of a K-quant type (gguf's numpy code cannot quantize to K types): random
    bytes with the f16 super-block scales set to moderate finite values. uint8 array (rows, bytes per row)."""
    import gguf
    import numpy as np
    T = gguf.GGMLQuantizationType
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    # byte offsets of the f16 scales (d, dmin) inside a block, as ggml lays them out
    f16_offsets = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]
    for offset in f16_offsets:
        scales = (rng.uniform(0.5, 1.0, blocks.shape[0]) / (64 * cols ** 0.5)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def write_flux_gguf(path: Path, qtype, *, guidance: bool = True, seed: int = 0) -> Path:
    """The tiny FLUX transformer as city96 lays FLUX GGUF files out: arch "flux", BFL names, 1-D tensors in
    F32, 2-D tensors whose rows are not whole blocks in F16, the rest in `qtype` (a GGMLQuantizationType or
    its name). Q4_0/Q8_0/... are quantized from the tiny model by gguf's numpy code; K-quants (which it
    cannot quantize to) get random valid blocks (`random_kquant_rows`). Returns the path."""
    import gguf
    import numpy as np
    T = gguf.GGMLQuantizationType
    qtype = T[qtype] if isinstance(qtype, str) else T(qtype)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    can_quantize = qtype in gguf.quants._type_traits and hasattr(gguf.quants._type_traits[qtype], "quantize_blocks") \
        and qtype not in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(qtype))
    for index, (name, tensor) in enumerate(tiny_flux_bfl(guidance, seed).items()):
        data = tensor.numpy().astype(np.float32)
        if data.ndim == 1:
            writer.add_tensor(name, data, raw_dtype=T.F32)
        elif data.shape[-1] % block_size:
            writer.add_tensor(name, data.astype(np.float16), raw_dtype=T.F16)
        elif can_quantize:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, random_kquant_rows(*data.shape, qtype, seed=seed + index), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as float32, dequantized by gguf's numpy code (the reference)."""
    import gguf
    import numpy as np
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.array(t.data), gguf.GGMLQuantizationType(int(t.tensor_type)))
        out[t.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
    return out


def write_flux_nf4(path: Path) -> Path:
    """A file laid out as bitsandbytes NF4 FLUX files are (Forge's flux1-dev-bnb-nf4): packed uint8 weights with
    `.absmax`, `.quant_map` and `.quant_state.bitsandbytes__nf4` tensors beside them (values random)."""
    from safetensors.torch import save_file
    sd = {}
    for name, tensor in tiny_flux_bfl(True).items():
        if tensor.ndim == 2:
            n = tensor.numel()
            sd[name] = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8)
            sd[name + ".absmax"] = torch.rand(n // 64)
            sd[name + ".quant_map"] = torch.linspace(-1, 1, 16)
            sd[name + ".quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
        else:
            sd[name] = tensor.to(torch.bfloat16)
    sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    save_file(sd, str(path))
    return Path(path)
