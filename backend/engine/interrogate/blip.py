"""BLIP captions as A1111's "Interrogate CLIP" makes them: Salesforce's `model_base_caption_capfilt_large.pth`.

The file (in `models/BLIP`, downloaded from Salesforce's storage on first use) holds the original BLIP layout
(`visual_encoder.*`: a timm ViT; `text_decoder.*`: a BERT decoder with cross-attention), read with
`weights_only`. Its keys are renamed to transformers' `BlipForConditionalGeneration` and the network's sizes are
read from the tensors' shapes (heads: one per 64 channels, as BLIP's ViT-B and BERT-base), so any file of this
layout loads. The decoder's tokenizer is bert-base-uncased's WordPiece vocabulary (`vocab.txt`, downloaded into
`models/BLIP/bert-base-uncased` on first use, as A1111's BLIP fetches it) plus BLIP's `[DEC]` and `[ENC]` tokens.

A caption: the picture resized to the model's size (384) bicubically, normalised with CLIP's mean and std, then
beam search from the prompt "a picture of " (`interrogate_clip_num_beams`, `interrogate_clip_min_length`,
`interrogate_clip_max_length`), the prompt taken off the text.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from backend.core.errors import UserError

FOLDER = "BLIP"
FILE_NAME = "model_base_caption_capfilt_large.pth"
URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_caption_capfilt_large.pth"
VOCAB_FOLDER = "bert-base-uncased"
VOCAB_NAME = "vocab.txt"
VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
PROMPT = "a picture of "
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_RENAMES = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
)


def find_model_file(folder: Path) -> Path | None:
    path = folder / FILE_NAME
    return path if path.is_file() else None


def find_vocab(folder: Path) -> Path | None:
    path = folder / VOCAB_FOLDER / VOCAB_NAME
    return path if path.is_file() else None


def hf_key(key: str) -> str | None:
    """The transformers name of an original BLIP key (None: a tensor the caption model does not use)."""
    if key.startswith("text_decoder."):
        return None if key.endswith("position_ids") else key
    for pattern, replacement in _VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Salesforce BLIP file (its `model` entry), read with `weights_only`."""
    from backend.engine.state_dict_io import load_pickle

    obj = load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict (found {type(obj).__name__}); it is not a BLIP model.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def config_from(state: dict[str, torch.Tensor], name: str, tokenizer):
    """transformers' `BlipConfig` of the file's sizes."""
    from transformers import BlipConfig

    try:
        patch = state["visual_encoder.patch_embed.proj.weight"]
        positions = state["visual_encoder.pos_embed"].shape[1]
        v_width, patch_size = patch.shape[0], patch.shape[-1]
        v_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
        v_inner = state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        words = state["text_decoder.bert.embeddings.word_embeddings.weight"]
        t_positions = state["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0]
        t_layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("text_decoder.bert.encoder.layer."))
        t_inner = state["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
        t_cross = state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(f"{name} is not a BLIP caption model (Salesforce's model_base_caption_capfilt_large.pth "
                        f"layout): {type(exc).__name__} {exc}.") from exc
    t_width = words.shape[1]
    vocab_size = len(tokenizer)
    if words.shape[0] != vocab_size:
        raise UserError(f"{name} has a vocabulary of {words.shape[0]} tokens but its tokenizer has {vocab_size} "
                        f"(bert-base-uncased's vocab.txt and [DEC], [ENC]); the files do not belong together.")
    grid = round((positions - 1) ** 0.5)
    vision = dict(hidden_size=v_width, num_hidden_layers=v_layers, num_attention_heads=max(1, v_width // 64),
                  intermediate_size=v_inner, image_size=grid * patch_size, patch_size=patch_size,
                  layer_norm_eps=1e-6)
    text = dict(vocab_size=words.shape[0], hidden_size=t_width, num_hidden_layers=t_layers,
                num_attention_heads=max(1, t_width // 64), intermediate_size=t_inner,
                max_position_embeddings=t_positions, encoder_hidden_size=t_cross, layer_norm_eps=1e-12,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return BlipConfig(vision_config=vision, text_config=text)


class BlipCaptioner:
    """A loaded BLIP caption model with its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def to(self, device, dtype) -> "BlipCaptioner":
        self.model.to(device, dtype)
        return self

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def caption(self, image, device, dtype, num_beams: int, min_length: int, max_length: int,
                interrupted=lambda: False) -> str:
        """The caption of `image`; generation ends early once `interrupted()` (the caller checks it again)."""
        import numpy as np
        from PIL import Image
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Interrupted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), bool(interrupted()), dtype=torch.bool, device=input_ids.device)

        size = self.image_size
        picture = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        ids = self.tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=x[None].to(device, dtype), input_ids=ids,
                                      attention_mask=torch.ones_like(ids), num_beams=int(num_beams),
                                      do_sample=False, min_length=int(min_length), max_length=int(max_length),
                                      repetition_penalty=1.0,
                                      stopping_criteria=StoppingCriteriaList([Interrupted()]))
        text = self.tokenizer.decode(out[0], skip_special_tokens=True)
        return text[len(PROMPT):] if text.startswith(PROMPT) else text.removeprefix(PROMPT.strip()).strip()


def tokenizer_from(vocab: Path):
    from transformers import BertTokenizer

    tokens = vocab.read_text(encoding="utf-8").splitlines()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_captioner(path: Path, vocab: Path) -> BlipCaptioner:
    from transformers import BlipForConditionalGeneration

    tokenizer = tokenizer_from(vocab)
    state = read_state_dict(path)
    config = config_from(state, path.name, tokenizer)
    model = BlipForConditionalGeneration(config)
    renamed = {}
    for key, tensor in state.items():
        new = hf_key(key)
        if new is not None:
            renamed[new] = tensor
    if "text_decoder.cls.predictions.decoder.bias" not in renamed and "text_decoder.cls.predictions.bias" in renamed:
        renamed["text_decoder.cls.predictions.decoder.bias"] = renamed["text_decoder.cls.predictions.bias"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed]
    wrong = [k for k in expected if k in renamed and renamed[k].shape != expected[k].shape]
    if missing or wrong:
        raise UserError(f"{path.name} does not fit the BLIP caption model ({len(missing)} tensors missing, "
                        f"{len(wrong)} of another shape, e.g. {', '.join((missing + wrong)[:2])}). The file may be "
                        f"damaged; delete it and download it again.")
    model.load_state_dict({k: renamed[k] for k in expected}, strict=True)
    model.eval().requires_grad_(False)
    return BlipCaptioner(model, tokenizer)
