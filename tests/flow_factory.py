"""Tiny FLUX.1 / Stable Diffusion 3 parts with the real architectures, written in the layouts people share.

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

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model_factory import _randomize  # noqa: E402

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
