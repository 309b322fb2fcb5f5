"""Tiny interrogation model files in their real formats, for the tests.

`write_tiny_deepbooru(path)`: a DeepDanbooru file in the layout of A1111's `model-resnet_custom_v3.pt` (a torch
pickle of `n_Conv_0` ... `n_Conv_178` tensors plus the `tags` list) with a few channels per layer. Its scores are
known in order: the last block's expanding convolution gives 1 everywhere, so every feature of the head's input is
at least 1, and the head reads channel 0 only, with the weight of `TAG_WEIGHTS` for each tag: a tag of weight w
scores sigmoid(w * f) with f >= 1 (w = 6: >= 0.9975; w = -6: <= 0.0025), higher weights scoring higher.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

# tag -> head weight on channel 0 (the order of the file's outputs)
TAG_WEIGHTS = {"cat": -6.0, "long_hair": 6.0, "rating:safe": 6.0, "smile": 2.0, "blue_(sky)": 4.0, "hat": 5.0,
               "dog": -6.0}
MID, OUT, STEM = 2, 4, 4  # channels of the tiny network: each block's 1x1/3x3 convolutions, its output, the stem


def write_tiny_deepbooru(path: Path, seed: int = 0) -> Path:
    import torch

    from backend.engine.interrogate.deepbooru_model import CONV_COUNT, LAYOUT

    gen = torch.Generator().manual_seed(seed)
    shapes = {0: (STEM, 3, 7, 7)}
    width = STEM
    for proj, (a, b, c), _ in LAYOUT:
        shapes[a], shapes[b], shapes[c] = (MID, width, 1, 1), (MID, MID, 3, 3), (OUT, MID, 1, 1)
        if proj is not None:
            shapes[proj] = (OUT, width, 1, 1)
        width = OUT
    state = OrderedDict()
    for i in range(CONV_COUNT - 1):
        state[f"n_Conv_{i}.weight"] = torch.randn(shapes[i], generator=gen) * 0.05
        state[f"n_Conv_{i}.bias"] = torch.randn(shapes[i][0], generator=gen) * 0.01
    last_expand = LAYOUT[-1][1][2]
    state[f"n_Conv_{last_expand}.weight"].zero_()
    state[f"n_Conv_{last_expand}.bias"].fill_(1.0)
    head = torch.zeros(len(TAG_WEIGHTS), OUT, 1, 1)
    head[:, 0, 0, 0] = torch.tensor(list(TAG_WEIGHTS.values()))
    state[f"n_Conv_{CONV_COUNT - 1}.weight"] = head
    state["tags"] = list(TAG_WEIGHTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# -- BLIP and CLIP (Interrogate CLIP) --------------------------------------------------------------------------------
BLIP_WORDS = ["a", "picture", "of", "red", "green", "boat", "house", "cat", "sky", "with", "the", "and", "on", "tree",
              "blue", "small", "big", "dog", "water", "field"]
_BLIP_VISION = (("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
                ("vision_model.post_layernorm.", "visual_encoder.norm."))
_BLIP_LAYER = ((".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
               (".self_attn.projection.", ".attn.proj."), (".mlp.", ".mlp."))


def write_blip_vocab(path: Path) -> Path:
    """A tiny WordPiece vocabulary in bert-base-uncased's vocab.txt format (special tokens first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BLIP_WORDS) + "\n", encoding="utf-8")
    return path


def write_tiny_blip(path: Path, vocab: Path, seed: int = 0) -> Path:
    """A BLIP caption checkpoint in Salesforce's layout (`{"model": {visual_encoder.*, text_decoder.*}}`), tiny:
    a 64-wide ViT of one block on 32x32 pictures and a 64-wide one-layer BERT decoder over `vocab` + [DEC], [ENC]."""
    import re

    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(seed)
    n_vocab = len(vocab.read_text(encoding="utf-8").split()) + 2
    cfg = BlipConfig(vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                        intermediate_size=128, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=n_vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                      intermediate_size=128, max_position_embeddings=64, encoder_hidden_size=64))
    hf = BlipForConditionalGeneration(cfg).state_dict()
    state = OrderedDict()
    for key, tensor in hf.items():
        new = key
        for a, b in _BLIP_VISION:
            new = new.replace(a, b) if new.startswith(a) else new
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)(\..*)", new)
        if m:
            rest = m.group(2)
            for a, b in _BLIP_LAYER:
                rest = rest.replace(a, b)
            new = f"visual_encoder.blocks.{m.group(1)}{rest}"
        state[new] = tensor.clone()
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """An OpenAI CLIP file as `ViT-L-14.pt` is one: a TorchScript archive whose parameters carry OpenAI's names
    (visual.conv1, visual.transformer.resblocks.N..., token_embedding, text_projection, ...), tiny: 64 wide, one
    layer per tower, 32x32 pictures, OpenAI's 49408-token vocabulary and 77-token context."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
                 quick_gelu=True)
    root = torch.nn.Module()
    for key, tensor in model.state_dict().items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(root).save(str(path))
    return path


CATEGORIES = {"mediums": ["a photograph", "an oil painting", "a drawing"],
              "movements": ["impressionism", "cubism"],
              "flavors.top3": ["sharp focus", "vibrant colors", "soft light", "high contrast"]}


def write_categories(folder: Path) -> Path:
    """Category files as A1111 reads them from models/interrogate: one phrase a line; `name.topN.txt` ranks N."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in CATEGORIES.items():
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
