"""The DeepDanbooru tagger network of A1111's `model-resnet_custom_v3.pt` (TorchDeepDanbooru), built from its file.

The network is a ResNet of bottleneck blocks whose convolutions are named `n_Conv_0` ... `n_Conv_178` in the
file; a block's stride and where its projection convolution sits are fixed by the architecture (`BLOCKS`), the
channel counts and kernel sizes are read from the tensors' shapes, so any file of this layout loads (the real
one: 64 ... 4096 channels and 9176 tags; the tests' tiny one: a few channels). The file's `tags` entry lists
the tag of each output; the output is each tag's probability (sigmoid).

Input: (N, H, W, 3) RGB in [0, 1], channels last (as A1111 feeds it, 512x512).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.core.errors import UserError

# The bottleneck blocks in the order their convolutions are numbered: (projection, stride).
# projection "first": the shortcut convolution is numbered before the block's three; "last": after them;
# None: an identity shortcut. A stride-2 block pads its 3x3 input on the right and bottom only.
_STAGES = (
    [("first", 1)] + [(None, 1)] * 2,
    [("first", 2)] + [(None, 1)] * 7,
    [("first", 2)] + [(None, 1)] * 19 + [("last", 2)] + [(None, 1)] * 19,
    [("first", 2)] + [(None, 1)] * 2,
    [("first", 2)] + [(None, 1)] * 2,
)
BLOCKS: tuple[tuple[str | None, int], ...] = tuple(block for stage in _STAGES for block in stage)
CONV_COUNT = 1 + sum(3 + (proj is not None) for proj, _ in BLOCKS) + 1  # stem, blocks, head: 179


def _block_layout() -> list[tuple[int | None, tuple[int, int, int], int]]:
    """Each block's (projection conv index or None, (reduce, 3x3, expand) conv indices, stride)."""
    layout, index = [], 1
    for proj, stride in BLOCKS:
        if proj == "first":
            layout.append((index, (index + 1, index + 2, index + 3), stride))
        elif proj == "last":
            layout.append((index + 3, (index, index + 1, index + 2), stride))
        else:
            layout.append((None, (index, index + 1, index + 2), stride))
        index += 3 + (proj is not None)
    return layout


LAYOUT = _block_layout()


class DeepDanbooruModel(nn.Module):
    """A1111's DeepDanbooru network with the channel counts of `state_dict` (see the module docstring)."""

    def __init__(self, shapes: dict[str, torch.Size], tags: list[str]):
        super().__init__()
        strides = {0: 2}
        for proj, (_, mid, _), stride in LAYOUT:
            strides[mid] = stride
            if proj is not None:
                strides[proj] = stride
        for i in range(CONV_COUNT):
            out_ch, in_ch, kh, kw = shapes[f"n_Conv_{i}.weight"]
            self.add_module(f"n_Conv_{i}", nn.Conv2d(in_ch, out_ch, kernel_size=(kh, kw), stride=strides.get(i, 1),
                                                    bias=f"n_Conv_{i}.bias" in shapes))
        self.tags = list(tags)

    def conv(self, i: int) -> nn.Conv2d:
        return getattr(self, f"n_Conv_{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = F.relu(self.conv(0)(F.pad(x, [2, 3, 2, 3], value=0.0)))
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), kernel_size=3, stride=2)
        for proj, (a, b, c), stride in LAYOUT:
            shortcut = self.conv(proj)(x) if proj is not None else x
            y = F.relu(self.conv(a)(x))
            y = F.pad(y, [0, 1, 0, 1] if stride == 2 else [1, 1, 1, 1], value=0.0)
            y = self.conv(c)(F.relu(self.conv(b)(y)))
            x = F.relu(y + shortcut)
        x = self.conv(CONV_COUNT - 1)(x)
        return torch.sigmoid(x.mean(dim=(2, 3)))


def build_from_state_dict(state: dict, name: str) -> DeepDanbooruModel:
    """The network of a DeepDanbooru file's contents (tensors plus `tags`), weights loaded; `UserError` naming the
    file when it is not one."""
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    missing = [f"n_Conv_{i}.weight" for i in range(CONV_COUNT) if f"n_Conv_{i}.weight" not in tensors]
    if missing:
        raise UserError(f"{name} is not a DeepDanbooru model (A1111's model-resnet_custom_v3.pt layout): it lacks "
                        f"{len(missing)} of its {CONV_COUNT} convolutions, e.g. {missing[0]}.")
    tags = state.get("tags")
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise UserError(f"{name} has no list of tags (its 'tags' entry); it is not a DeepDanbooru model file.")
    outputs = tensors[f"n_Conv_{CONV_COUNT - 1}.weight"].shape[0]
    if outputs != len(tags):
        raise UserError(f"{name} is damaged: its network has {outputs} outputs but it lists {len(tags)} tags.")
    try:
        model = DeepDanbooruModel({k: v.shape for k, v in tensors.items()}, tags)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{name} does not fit the DeepDanbooru network ({str(exc).splitlines()[0][:200]}). The file "
                        f"may be damaged; delete it and download it again.") from exc
    return model.eval().requires_grad_(False)
