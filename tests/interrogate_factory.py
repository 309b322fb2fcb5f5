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
