"""Tiny FLUX.1 / Stable Diffusion 3 files with the real architectures, written in the layouts people share.

Each builder makes small random diffusers/transformers modules shaped like the real ones and writes
them under the real key names, so the tests run the same detection and loading code as real files.

SD 3 / 3.5 (`write_sd3`): Stability AI's single-file layout, the transformer as
`model.diffusion_model.{x_embedder, pos_embed, t_embedder, y_embedder, context_embedder,
joint_blocks.N.{x_block,context_block}, final_layer}` (converted from a diffusers
`SD3Transformer2DModel` by the inverse of diffusers' mapping, here in test code), the 16-channel VAE
as `first_stage_model.*` (LDM names) and, optionally, CLIP-L / CLIP-G / T5 as
`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (transformers' names).

FLUX.1 transformer (`write_flux_bfl`, `write_flux_gguf`, `write_flux_nf4`): BFL layout, float8, GGUF as city96's files.

LoRA files for FLUX / SD3: see the section below (`write_flux_lora_kohya`, `..._peft`, `..._xlabs`, `write_sd3_lora`).

Text encoders and the T5 tokenizer:
- `train_t5_tokenizer(models_dir)`: a tiny SentencePiece unigram model (T5's ids: <pad> 0, </s> 1, <unk> 2, NFKC
  normalization) trained in the fixture with sentencepiece's trainer, saved as
  `models_dir/text_encoder/t5-tokenizer/spiece.model`, where `t5_tokenizer` reads it;
- `write_t5(path, dtype=...)`: a tiny T5 v1.1 encoder (gated GELU, relative position buckets) in transformers'
  T5EncoderModel names (`shared.weight`, `encoder.block.N.layer...`), float32/bf16/fp16 or float8 as the fp8 files;
- `write_clip_l(path)`, `write_clip_g(path)`: tiny CLIPTextModel / CLIPTextModelWithProjection in transformers'
  names (`text_model.*`, `text_projection.weight`).
Each `write_*` takes `prefix` (e.g. ComfyUI's "text_encoders.t5xxl.transformer.") and returns the float32 module it
wrote (the reference). Weights come from a seeded generator. Plain module imported by fixtures (not a test file).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from model_factory import _clip_l, _open_clip, _randomize  # noqa: E402

from backend.engine.ldm_convert import convert_vae_diffusers_to_ldm  # noqa: E402

# -- the 16-channel VAE (FLUX.1 and SD3) --------------------------------------------------------------
FLOW_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
                   "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 32, 32],
                   "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 512,
                   "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}


def tiny_flow_vae(*, scaling_factor: float, shift_factor: float, seed: int = 0):
    """A random 16-channel AutoencoderKL (4 levels: 8x down, no quant convs) with the given latent factors."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**FLOW_VAE_CONFIG, scaling_factor=scaling_factor, shift_factor=shift_factor)
    _randomize(vae, torch.Generator().manual_seed(seed))
    return vae.eval().requires_grad_(False)


def flow_vae_ldm(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's tensors under LDM names (as `ae.safetensors` / `first_stage_model.*`)."""
    return convert_vae_diffusers_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))


# -- SD 3 / 3.5 ----------------------------------------------------------------------------------------
SD3_VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
SD3_CLIP_L_HIDDEN = 32
SD3_CLIP_G_HIDDEN = 64
SD3_T5_DIM = 128   # the context width: CLIP-L ++ CLIP-G (96 channels) zero-padded to it, as 768 + 1280 -> 4096
SD3_POOLED = SD3_CLIP_L_HIDDEN + SD3_CLIP_G_HIDDEN


def sd3_transformer_config(variant: str = "sd3.5-medium") -> dict:
    """SD3Transformer2DModel kwargs of a tiny `variant`: 2 joint blocks; sd3-medium 2 x 64-channel heads (no q/k
    norm, so the head width is the published 64); 3.5 2 x 16-channel heads with RMS q/k norm; 3.5 medium's
    first block with the image stream's second attention."""
    if variant not in SD3_VARIANTS:
        raise ValueError(f"variant must be one of {SD3_VARIANTS}")
    is35 = variant != "sd3-medium"
    head_dim = 16 if is35 else 64
    return {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": head_dim,
            "num_attention_heads": 2, "joint_attention_dim": SD3_T5_DIM, "caption_projection_dim": 2 * head_dim,
            "pooled_projection_dim": SD3_POOLED, "out_channels": 16, "pos_embed_max_size": 16,
            "dual_attention_layers": (0,) if variant == "sd3.5-medium" else (),
            "qk_norm": "rms_norm" if is35 else None}


def tiny_sd3_transformer(variant: str = "sd3.5-medium", *, seed: int = 0):
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(**sd3_transformer_config(variant))
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_sai(model) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel's tensors under Stability AI's names (no prefix).

    SAI's layout stores q, k, v stacked (`qkv`) and the pre-only modulations as (shift, scale) where
    diffusers has (scale, shift). Every diffusers tensor must be placed (asserted)."""
    sd = dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return sd.pop(name)

    def move(diffusers_name: str, sai_name: str, swap: bool = False) -> None:
        for suffix in ("weight", "bias"):
            if f"{diffusers_name}.{suffix}" in sd:
                t = take(f"{diffusers_name}.{suffix}")
                out[f"{sai_name}.{suffix}"] = _swap_halves(t) if swap else t

    def stack(prefix: str, names: tuple[str, str, str], sai_name: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{sai_name}.{suffix}"] = torch.cat([take(f"{prefix}.{n}.{suffix}") for n in names], dim=0)

    out["pos_embed"] = take("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    layers = model.config.num_layers
    for i in range(layers):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == layers - 1
        stack(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{x}.attn.qkv")
        stack(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{c}.attn.qkv")
        move(f"{d}.attn.norm_q", f"{x}.attn.ln_q")
        move(f"{d}.attn.norm_k", f"{x}.attn.ln_k")
        move(f"{d}.attn.norm_added_q", f"{c}.attn.ln_q")
        move(f"{d}.attn.norm_added_k", f"{c}.attn.ln_k")
        move(f"{d}.attn.to_out.0", f"{x}.attn.proj")
        move(f"{d}.attn.to_add_out", f"{c}.attn.proj")
        if f"{d}.attn2.to_q.weight" in sd:
            stack(f"{d}.attn2", ("to_q", "to_k", "to_v"), f"{x}.attn2.qkv")
            move(f"{d}.attn2.norm_q", f"{x}.attn2.ln_q")
            move(f"{d}.attn2.norm_k", f"{x}.attn2.ln_k")
            move(f"{d}.attn2.to_out.0", f"{x}.attn2.proj")
        move(f"{d}.norm1.linear", f"{x}.adaLN_modulation.1")
        move(f"{d}.norm1_context.linear", f"{c}.adaLN_modulation.1", swap=last)
        move(f"{d}.ff.net.0.proj", f"{x}.mlp.fc1")
        move(f"{d}.ff.net.2", f"{x}.mlp.fc2")
        move(f"{d}.ff_context.net.0.proj", f"{c}.mlp.fc1")
        move(f"{d}.ff_context.net.2", f"{c}.mlp.fc2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    assert not sd, f"diffusers tensors without an SAI name: {sorted(sd)}"
    return out


def tiny_sd3_encoders(*, seed: int = 0, clip_l_projection: bool = True, t5_vocab: int = 32128) -> dict:
    """Random tiny CLIP-L (with its text projection, as in SAI's files, unless `clip_l_projection` is False),
    CLIP-G (with projection) and T5 v1.1 encoder (gated-gelu) modules: {"clip_l", "clip_g", "t5xxl"}."""
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)
    generator = torch.Generator().manual_seed(seed + 100)
    clip_l_config = CLIPTextConfig(**_clip_l(SD3_CLIP_L_HIDDEN), projection_dim=SD3_CLIP_L_HIDDEN)
    clip_l = (CLIPTextModelWithProjection if clip_l_projection else CLIPTextModel)(clip_l_config)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**_open_clip(SD3_CLIP_G_HIDDEN,
                                                                     projection_dim=SD3_CLIP_G_HIDDEN)))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=SD3_T5_DIM, d_kv=32, d_ff=2 * SD3_T5_DIM,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                 layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False))
    for module in (clip_l, clip_g, t5):
        _randomize(module, generator)
        module.eval().requires_grad_(False)
    return {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}


def _encoder_tensors(module) -> dict[str, torch.Tensor]:
    """A text encoder's tensors as transformers saves them (no position_ids buffer, T5's tied copy dropped)."""
    sd = module.state_dict()
    return {k: v for k, v in sd.items() if not k.endswith("position_ids") and k != "encoder.embed_tokens.weight"}


def _fp8(tensors: dict[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """Matrices as float8_e4m3fn (ComfyUI's "scaled" files: stored / scale, with `scale_weight` beside)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.ndim == 2:
            if scaled:
                scale = value.abs().max().float() / 448.0
                out[key] = (value / scale).to(torch.float8_e4m3fn)
                out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[key] = value.to(torch.float8_e4m3fn)
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_sd3(path: Path, *, variant: str = "sd3.5-medium", with_encoders: bool = True, with_vae: bool = True,
              prefixed: bool = True, weights: str = "fp32", seed: int = 0, clip_l_projection: bool = True,
              t5_vocab: int = 32128) -> dict:
    """Write a tiny SD 3 / 3.5 single file in Stability AI's layout to `path` (.safetensors); return the modules.

    variant: "sd3-medium" | "sd3.5-medium" | "sd3.5-large". with_encoders: also CLIP-L, CLIP-G and T5 under
    `text_encoders.*.transformer.`; with_vae: the VAE under `first_stage_model.`. prefixed=False writes a
    transformer-only file with SAI names at the top level (with_vae/with_encoders must be False). weights: the
    transformer's storage, "fp32", "bf16", "fp16", "fp8" (float8_e4m3fn matrices) or "fp8_scaled" (ComfyUI's
    scaled fp8). Returns {"transformer", "vae", "clip_l", "clip_g", "t5xxl"} modules (those written) and
    "sai": the transformer's float32 tensors under SAI names."""
    from safetensors.torch import save_file

    from backend.engine.families.flow_vae import FLOW_VAE_FACTORS

    if not prefixed and (with_encoders or with_vae):
        raise ValueError("an unprefixed file holds the transformer alone")
    transformer = tiny_sd3_transformer(variant, seed=seed)
    sai = sd3_transformer_to_sai(transformer)
    stored = {"fp32": lambda t: t, "bf16": lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()},
              "fp16": lambda t: {k: v.to(torch.float16) for k, v in t.items()},
              "fp8": lambda t: _fp8(t, scaled=False), "fp8_scaled": lambda t: _fp8(t, scaled=True)}[weights](sai)
    prefix = "model.diffusion_model." if prefixed else ""
    out = {prefix + k: v for k, v in stored.items()}
    result: dict = {"transformer": transformer, "sai": {k: v.clone() for k, v in sai.items()}}
    if with_vae:
        scale, shift = FLOW_VAE_FACTORS["sd3"]
        vae = tiny_flow_vae(scaling_factor=scale, shift_factor=shift, seed=seed + 1)
        out.update({"first_stage_model." + k: v for k, v in flow_vae_ldm(vae).items()})
        result["vae"] = vae
    if with_encoders:
        encoders = tiny_sd3_encoders(seed=seed, clip_l_projection=clip_l_projection, t5_vocab=t5_vocab)
        for name, module in encoders.items():
            out.update({f"text_encoders.{name}.transformer.{k}": v for k, v in _encoder_tensors(module).items()})
        result.update(encoders)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(path), metadata={"format": "pt"})
    return result


# -- text encoders and the T5 tokenizer ---------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


T5_TINY = {"vocab_size": 512, "d_model": 96, "d_kv": 16, "d_ff": 96, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
           "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False}
CLIP_L_TINY = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
CLIP_G_TINY = {**CLIP_L_TINY, "hidden_act": "gelu", "pad_token_id": 0, "projection_dim": 32}

_TOKENIZER_CORPUS = """a photo of a cat sitting on a red chair
the quick brown fox jumps over the lazy dog
masterpiece, best quality, portrait of a woman with blue eyes and long hair
a landscape with mountains, a lake and a forest at sunset, highly detailed
an astronaut riding a horse on the moon, digital art, 4k, trending
oil painting of a city street in the rain, people with umbrellas
0123456789 ( ) [ ] : , . ! ? - _ ' " / < > | BREAK
"""


def train_t5_tokenizer(models_dir: Path, vocab_size: int = 300) -> Path:
    """A tiny T5-style SentencePiece model at models_dir/text_encoder/t5-tokenizer/spiece.model (its path)."""
    import sentencepiece as spm

    from backend.engine.families.t5_tokenizer import t5_tokenizer_path

    path = t5_tokenizer_path(models_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _TOKENIZER_CORPUS.splitlines() * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", minloglevel=2)
    path.with_suffix(".vocab").unlink(missing_ok=True)
    return path


def build_t5(seed: int = 0, **overrides):
    from transformers import T5Config, T5EncoderModel
    model = T5EncoderModel(T5Config(**{**T5_TINY, **overrides}))
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def build_clip(kind: str = "clip_l", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    if kind == "clip_l":
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TINY))
    else:
        model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TINY))
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def _save(path: Path, sd: dict[str, torch.Tensor], prefix: str) -> None:
    from safetensors.torch import save_file
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))


def _hf_clip_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP names as the files have them (`text_model.` in front of the text tower's tensors)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.clone()
            for k, v in sd.items() if not k.endswith("position_ids")}


def write_t5(path: Path, dtype: torch.dtype = torch.float32, *, prefix: str = "", seed: int = 0,
             scaled: bool = False):
    """A tiny T5 encoder file as `t5xxl_fp16` / `t5xxl_fp8_e4m3fn` are laid out; returns the float32 module.

    float8: every floating tensor is stored in that dtype (the hardest case for the loader); `scaled` writes
    ComfyUI's scaled float8 (each matrix divided by a per-tensor `scale_weight`, marker `scaled_fp8`).
    """
    model = build_t5(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scaled:
        out = {"scaled_fp8": torch.zeros(0, dtype=dtype)}
        for k, v in sd.items():
            if v.ndim == 2:
                scale = v.abs().max() / 448.0
                out[k] = (v / scale).to(dtype)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v.to(dtype)
        sd = out
    else:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    _save(path, sd, prefix)
    return model


def write_clip_l(path: Path, *, prefix: str = "", seed: int = 0, with_projection: bool = False):
    """A tiny CLIP-L file (`clip_l.safetensors`); `with_projection` adds SD3's `text_projection.weight`."""
    model = build_clip("clip_l", seed)
    sd = _hf_clip_names(model.state_dict())
    if with_projection:
        sd["text_projection.weight"] = torch.eye(CLIP_L_TINY["hidden_size"])
    _save(path, sd, prefix)
    return model


def write_clip_g(path: Path, *, prefix: str = "", seed: int = 1):
    """A tiny CLIP-G file (`clip_g.safetensors`, CLIPTextModelWithProjection names)."""
    model = build_clip("clip_g", seed)
    _save(path, _hf_clip_names(model.state_dict()), prefix)
    return model


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


class _ToBfl:
    """Test-side inverse of the loader's renaming: moves a diffusers FLUX state dict's tensors (`sd`, consumed) to
    Black Forest Labs' names in `out` (`mod`: one module, `fuse`: modules concatenated by rows)."""

    def __init__(self, sd: dict[str, torch.Tensor], config: dict):
        self.sd, self.config, self.out = dict(sd), config, {}

    def mod(self, dst, src):
        for s in ("weight", "bias"):
            self.out[f"{dst}.{s}"] = self.sd.pop(f"{src}.{s}")

    def fuse(self, dst, srcs):
        for s in ("weight", "bias"):
            self.out[f"{dst}.{s}"] = torch.cat([self.sd.pop(f"{src}.{s}") for src in srcs])

    def embedders(self):
        mod = self.mod
        mod("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
        mod("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
        mod("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
        mod("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
        if self.config["guidance_embeds"]:
            mod("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
            mod("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
        mod("txt_in", "context_embedder")
        mod("img_in", "x_embedder")

    def double_block(self, i: int):
        mod, fuse, sd, out = self.mod, self.fuse, self.sd, self.out
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


def diffusers_to_bfl(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The Black Forest Labs names of a diffusers FLUX state dict (fused qkv / linear1, (shift, scale) order)."""
    to = _ToBfl(sd, config)
    sd, out, mod, fuse = to.sd, to.out, to.mod, to.fuse
    inner = config["attention_head_dim"] * config["num_attention_heads"]
    to.embedders()
    mod("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{s}").split(inner)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for i in range(config["num_layers"]):
        to.double_block(i)
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


def write_flux_gguf(path: Path, qtype, *, guidance: bool = True, seed: int = 0,
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The tiny FLUX transformer as city96 lays FLUX GGUF files out: arch "flux", BFL names, 1-D tensors in
    F32, 2-D tensors whose rows are not whole blocks in F16, the rest in `qtype` (a GGMLQuantizationType or
    its name). Q4_0/Q8_0/... are quantized from the tiny model by gguf's numpy code; K-quants (which it
    cannot quantize to) get random valid blocks (`random_kquant_rows`). `tensors`: BFL float32 tensors to write
    instead of the tiny model's. Returns the path."""
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
    tensors = tiny_flux_bfl(guidance, seed) if tensors is None else tensors
    for index, (name, tensor) in enumerate(tensors.items()):
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


NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)  # bitsandbytes' NF4 code book (its quant_map)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, nested: bool = True) -> dict:
    """`weight` as bitsandbytes stores an NF4 weight (`QuantState.as_dict(packed=True)` beside the packed codes):
    {"": packed (n/2, 1) uint8, ".absmax", ".quant_map", [".nested_absmax", ".nested_quant_map"],
    ".quant_state.bitsandbytes__nf4"}, the scales doubly quantized (8-bit codes, a nested scale per 256) when
    `nested`. Written here from the format, independently of Easel's reader."""
    import json
    flat = weight.float().reshape(-1)
    blocks = flat.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-8)
    code = torch.tensor(NF4_CODE)
    codes = ((blocks / absmax[:, None])[..., None] - code).abs().argmin(dim=-1).reshape(-1).to(torch.uint8)
    packed = (codes[0::2] << 4 | codes[1::2]).reshape(-1, 1)
    info = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "bfloat16", "shape": list(weight.shape)}
    out = {"": packed, ".quant_map": code}
    if nested:
        offset = absmax.mean()
        centred = absmax - offset
        nested_map = torch.linspace(-1, 1, 256)
        nested_absmax = torch.stack([c.abs().max().clamp_min(1e-8) for c in centred.split(256)])
        scale = nested_absmax[torch.arange(centred.numel()) // 256]
        out[".absmax"] = ((centred / scale)[:, None] - nested_map).abs().argmin(dim=1).to(torch.uint8)
        out[".nested_absmax"], out[".nested_quant_map"] = nested_absmax, nested_map
        info.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
    else:
        out[".absmax"] = absmax
    out[".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return out


def nf4_dequantize(stored: dict) -> torch.Tensor:
    """The values an NF4 weight written by `nf4_quantize` stands for (numpy, element by element in blocks)."""
    import json

    import numpy as np
    info = json.loads(bytes(stored[".quant_state.bitsandbytes__nf4"].tolist()).decode())
    packed = stored[""].numpy().reshape(-1)
    codes = np.empty(packed.size * 2, dtype=np.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    absmax = stored[".absmax"].numpy()
    if ".nested_absmax" in stored:
        nested = stored[".nested_absmax"].numpy()
        absmax = np.array([stored[".nested_quant_map"].numpy()[c] * nested[i // info["nested_blocksize"]]
                           for i, c in enumerate(absmax)]) + info["nested_offset"]
    values = stored[".quant_map"].numpy()[codes] * np.repeat(absmax, info["blocksize"])
    return torch.from_numpy(values.astype(np.float32)).reshape(info["shape"])


def write_flux_nf4(path: Path, nested: bool = True) -> tuple[Path, dict]:
    """A tiny FLUX.1 transformer laid out as Forge's bitsandbytes NF4 files (flux1-dev-bnb-nf4-v2): the linear
    weights NF4 (`nf4_quantize`), the rest bfloat16, under `model.diffusion_model.`. Returns the path and the BFL
    state dict of the values the NF4 weights stand for (`nf4_dequantize`)."""
    sd, values = nf4_state_dict(tiny_flux_bfl(True), nested=nested)
    _save(path, sd, "model.diffusion_model.")
    return Path(path), values


def nf4_state_dict(bfl: dict, nested: bool = True) -> tuple[dict, dict]:
    """A BFL state dict as Forge's bnb-nf4 files store it (the linear weights NF4, the rest bfloat16), and the values
    it stands for (the NF4 weights' float32 values by `nf4_dequantize`, as Easel computes them)."""
    sd, values = {}, {}
    for name, tensor in bfl.items():
        if tensor.ndim == 2 and tensor.numel() % 64 == 0:
            stored = nf4_quantize(tensor, nested=nested)
            sd.update({name + suffix: v for suffix, v in stored.items()})
            values[name] = nf4_dequantize(stored)
        else:
            sd[name] = values[name] = tensor.to(torch.bfloat16)
    return sd, values


# -- SAMPLING: FlowModel objects built directly (random weights), and a stand-in text conditioner ----------------
STANDIN_FLUX_CONTEXT, STANDIN_FLUX_POOLED = 32, 24
STANDIN_SD3_CONTEXT, STANDIN_SD3_POOLED = 32, 24


def sampling_flow_vae(seed: int = 0):
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
                                         joint_attention_dim=STANDIN_FLUX_CONTEXT, pooled_projection_dim=STANDIN_FLUX_POOLED,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)).eval()
    variant = "flux-dev" if guidance_embeds else "flux-schnell"
    return FlowModel(family="flux", variant=variant, transformer=transformer, vae=sampling_flow_vae(seed),
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
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=STANDIN_SD3_CONTEXT,
                                        caption_projection_dim=32, pooled_projection_dim=STANDIN_SD3_POOLED, out_channels=16,
                                        pos_embed_max_size=32).eval()
    return FlowModel(family="sd3", variant="sd3.5-medium", transformer=transformer, vae=sampling_flow_vae(seed),
                     text_encoders={}, tokenizers={}, vae_scale_factor=1.5305, vae_shift_factor=0.0609,
                     shift=SD3_SHIFT, guidance_embeds=False, parts={"transformer": "tiny-sd3.safetensors"})


class StandInFlowConditioner:
    """What the pipelines call on a text conditioner, for a FlowModel: every prompt gets a fixed pseudo-random
    encoding of the model's widths (context [tokens, D], pooled [P]) derived from its text."""

    TOKENS = 8

    def __init__(self, model, device, embeddings=None, should_stop=None, emphasis="Original"):
        self.model, self.device = model, device
        self.context_dim, self.pooled_dim = ((STANDIN_FLUX_CONTEXT, STANDIN_FLUX_POOLED) if model.family == "flux"
                                             else (STANDIN_SD3_CONTEXT, STANDIN_SD3_POOLED))
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


def _save_lora(path: Path, tensors: dict, metadata: dict | None = None) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
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
    return _save_lora(path, out, metadata)


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
    return _save_lora(path, out)


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
    return _save_lora(path, out)


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
    return _save_lora(path, out, metadata)


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


# -- whole model sets in a models folder, as users lay them out (end-to-end tests through the API) ---------------
def write_flux_set(models_dir: Path, *, name: str = "flux-tiny", guidance: bool = True, all_in_one: bool = False,
                   gguf: str | None = None, nf4: bool = False, with_parts: bool = True, seed: int = 0) -> dict:
    """A tiny FLUX.1 whose parts fit each other, as users keep them: the transformer alone in BFL layout in
    models/Stable-diffusion/<name>.safetensors with `ae.safetensors` in models/VAE, `clip_l.safetensors` and
    `t5xxl_tiny.safetensors` in models/text_encoder, the T5 tokenizer where `t5_tokenizer` reads it; or with
    `all_in_one`, everything in the checkpoint under ComfyUI's prefixes; with `gguf` (a quantization type name) the
    transformer as a .gguf file as city96's; with `nf4` its linear weights as Forge's bnb-nf4 files hold them (under
    `model.diffusion_model.`). Returns the written paths by part and the diffusers transformer ("module", float32)
    the files hold (before any quantization). `with_parts=False` writes the transformer file only."""
    from diffusers import FluxTransformer2DModel
    models_dir = Path(models_dir)
    config = {**tiny_flux_config(guidance), "joint_attention_dim": T5_TINY["d_model"],
              "pooled_projection_dim": CLIP_L_TINY["hidden_size"]}
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config)
    _randomize(transformer, torch.Generator().manual_seed(seed))
    bfl = diffusers_to_bfl(transformer.state_dict(), config)
    vae = flow_vae_ldm(tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1))
    clip_l = _hf_clip_names(build_clip("clip_l", seed + 2).state_dict())
    t5 = {k: v.clone() for k, v in build_t5(seed + 3).state_dict().items() if k != "encoder.embed_tokens.weight"}
    if with_parts:
        train_t5_tokenizer(models_dir)
    ckpt = models_dir / "Stable-diffusion" / f"{name}.{'gguf' if gguf else 'safetensors'}"
    paths = {"checkpoint": ckpt, "module": transformer.eval()}
    if all_in_one:
        sd = {"model.diffusion_model." + k: v for k, v in bfl.items()}
        sd.update({"vae." + k: v for k, v in vae.items()})
        sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip_l.items()})
        sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
        _save(ckpt, sd, "")
        return paths
    if gguf:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        write_flux_gguf(ckpt, gguf, tensors=bfl)
    elif nf4:
        _save(ckpt, nf4_state_dict(bfl)[0], "model.diffusion_model.")
    else:
        _save(ckpt, bfl, "")
    if not with_parts:
        return paths
    paths["vae"] = models_dir / "VAE" / "ae.safetensors"
    _save(paths["vae"], vae, "")
    paths["clip_l"] = models_dir / "text_encoder" / "clip_l.safetensors"
    _save(paths["clip_l"], clip_l, "")
    paths["t5xxl"] = models_dir / "text_encoder" / "t5xxl_tiny.safetensors"
    _save(paths["t5xxl"], t5, "")
    return paths


# -- FLUX.1 ControlNets ------------------------------------------------------------------------------
# Tiny ControlNets matching `build_tiny_flux` (2 heads x 32, rope axes (4, 14, 14), T5 width 32, pooled 16):
# InstantX / Shakker-Labs in diffusers' FluxControlNetModel layout (union: `controlnet_mode_embedder`), and
# XLabs' own file (x-flux: BFL names, `pos_embed_input`, the conv hint encoder `input_hint_block.{0..14}`).
# Every weight is random (no zero-initialized output projections), so every path changes the residuals.

def tiny_flux_deeper(layers: int = 3, single_layers: int = 4, *, guidance: bool = True, seed: int = 0):
    """`build_tiny_flux`'s transformer with more blocks (to see how ControlNet outputs map onto blocks)."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**tiny_flux_config(guidance), "num_layers": layers,
                                      "num_single_layers": single_layers})
    _randomize_flux(model, seed)
    return model.eval()


def _randomize_flux(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 16
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in ** 0.5))


def tiny_flux_controlnet(*, union: bool = False, xlabs: bool = False, layers: int = 2, single_layers: int = 1,
                         guidance: bool = True, seed: int = 0, overrides: dict | None = None):
    """A diffusers FluxControlNetModel shaped like the tiny FLUX: InstantX-like (`union`: 7 control modes),
    or XLabs-like (`xlabs`: conv hint encoder, 2x2 patches, no single blocks), random float32 weights; `overrides`:
    config entries that differ (e.g. the text widths of another tiny FLUX)."""
    from diffusers import FluxControlNetModel
    config = {**tiny_flux_config(guidance), "num_layers": layers, "num_single_layers": 0 if xlabs else single_layers,
              "num_mode": 7 if union else None, **(overrides or {})}
    config.pop("out_channels")
    if xlabs:
        config.update({"patch_size": 2, "conditioning_embedding_channels": 16})
    torch.manual_seed(seed)
    model = FluxControlNetModel(**config)
    _randomize_flux(model, seed + 1)
    return model.eval()


def write_flux_controlnet_instantx(path: Path, *, union: bool = True, dtype: torch.dtype = torch.float32,
                                   seed: int = 0, **kw):
    """An InstantX / Shakker-Labs FLUX ControlNet (diffusers layout) at `path`; returns the float32 module."""
    from safetensors.torch import save_file
    model = tiny_flux_controlnet(union=union, seed=seed, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def xlabs_names(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FluxControlNetModel (XLabs-like) state dict in x-flux's names (test-side inverse mapping)."""
    to = _ToBfl(sd, config)
    sd, out, mod = to.sd, to.out, to.mod
    to.embedders()
    mod("pos_embed_input", "controlnet_x_embedder")
    for i in range(config["num_layers"]):
        to.double_block(i)
        mod(f"controlnet_blocks.{i}", f"controlnet_blocks.{i}")
    hint = ["conv_in"] + [f"blocks.{j}" for j in range(6)] + ["conv_out"]
    for j, name in enumerate(hint):
        mod(f"input_hint_block.{2 * j}", f"input_hint_block.{name}")
    assert not sd, f"unmapped tensors: {sorted(sd)}"
    return out


def write_flux_controlnet_xlabs(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, **kw):
    """An XLabs (x-flux) FLUX ControlNet file at `path`; returns the float32 diffusers module it holds."""
    from safetensors.torch import save_file
    model = tiny_flux_controlnet(xlabs=True, seed=seed, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = xlabs_names(model.state_dict(), dict(model.config))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return model
