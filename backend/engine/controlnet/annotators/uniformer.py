"""ADE20K segmentation (`upernet_global_small.pth`): UniFormer-S with an UperNet head, the ADE20K palette, and the
`segmentation` preprocessor (`seg_ufade20k`), each pixel painted in its class's colour."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import resize_with_pad
from backend.engine.controlnet.annotators.common import AnnotatorEnv, WeightFile, env_from

UNIFORMER_WEIGHTS = WeightFile(
    "upernet_global_small.pth", "uniformer",
    "https://huggingface.co/lllyasviel/ControlNet/resolve/main/annotator/ckpts/upernet_global_small.pth")
# The ADE20K colour of each of the 150 classes (the dataset's standard table; ControlNet's seg models use it).
ADE20K_PALETTE = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255)]


def network():
    """UniFormer-S (conv blocks in stages 1-2, global self-attention in 3-4) with an UperNet head for the 150
    ADE20K classes; keys as in `upernet_global_small.pth` (`backbone.*`, `decode_head.*`; the training-only
    `auxiliary_head.*` is not used)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    dims, depths = (64, 128, 320, 512), (3, 4, 8, 3)

    class PatchEmbed(nn.Module):
        def __init__(self, cin, cout, patch):
            super().__init__()
            self.proj = nn.Conv2d(cin, cout, patch, patch)
            self.norm = nn.LayerNorm(cout)

        def forward(self, x):
            x = self.proj(x)
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ConvMlp(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(dim, dim * 4, 1), nn.Conv2d(dim * 4, dim, 1)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class ConvBlock(nn.Module):  # "CBlock": local aggregation by a 5x5 depthwise conv
        def __init__(self, dim):
            super().__init__()
            self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.norm1, self.norm2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)
            self.conv1, self.conv2 = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
            self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
            self.mlp = ConvMlp(dim)

        def forward(self, x):
            x = x + self.pos_embed(x)
            x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
            return x + self.mlp(self.norm2(x))

    class Attention(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.heads = dim // 64
            self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, dim * 4), nn.Linear(dim * 4, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class AttnBlock(nn.Module):  # "SABlock": global multi-head self-attention
        def __init__(self, dim):
            super().__init__()
            self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.attn, self.mlp = Attention(dim), Mlp(dim)

        def forward(self, x):
            x = x + self.pos_embed(x)
            b, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            t = t + self.attn(self.norm1(t))
            t = t + self.mlp(self.norm2(t))
            return t.transpose(1, 2).reshape(b, c, h, w)

    class UniFormer(nn.Module):
        def __init__(self):
            super().__init__()
            cin = 3
            for i, (dim, depth) in enumerate(zip(dims, depths), 1):
                setattr(self, f"patch_embed{i}", PatchEmbed(cin, dim, 4 if i == 1 else 2))
                block = ConvBlock if i <= 2 else AttnBlock
                setattr(self, f"blocks{i}", nn.ModuleList([block(dim) for _ in range(depth)]))
                setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
                cin = dim

        def forward(self, x):
            outs = []
            for i in range(1, 5):
                x = getattr(self, f"patch_embed{i}")(x)
                for blk in getattr(self, f"blocks{i}"):
                    x = blk(x)
                outs.append(getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            return outs

    class ConvModule(nn.Module):  # mmcv's conv + BN + ReLU, named conv / bn
        def __init__(self, cin, cout, k):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class UPerHead(nn.Module):
        def __init__(self, channels=512, scales=(1, 2, 3, 6), classes=150):
            super().__init__()
            self.scales = scales
            self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(dims[-1], channels, 1))
                                              for s in scales])
            self.bottleneck = ConvModule(dims[-1] + len(scales) * channels, channels, 3)
            self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in dims[:-1]])
            self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in dims[:-1]])
            self.fpn_bottleneck = ConvModule(len(dims) * channels, channels, 3)
            self.conv_seg = nn.Conv2d(channels, classes, 1)

        @staticmethod
        def up(x, size):
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        def forward(self, feats):
            top = feats[-1]
            psp = [top] + [self.up(m(top), top.shape[2:]) for m in self.psp_modules]
            laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
            laterals.append(self.bottleneck(torch.cat(psp, 1)))
            for i in range(len(laterals) - 1, 0, -1):
                laterals[i - 1] = laterals[i - 1] + self.up(laterals[i], laterals[i - 1].shape[2:])
            outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
            outs = [outs[0]] + [self.up(o, outs[0].shape[2:]) for o in outs[1:]]
            return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))

    class Segmentor(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = UniFormer()
            self.decode_head = UPerHead()

        def forward(self, x):
            logits = self.decode_head(self.backbone(x))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)

    return Segmentor()


def _uniformer_keys(net, sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}


def segment_ade20k(img: np.ndarray, env: AnnotatorEnv) -> np.ndarray:
    """Each pixel painted in the ADE20K colour of its most likely class."""
    import torch
    net = env.load("uniformer", UNIFORMER_WEIGHTS, "segmentation", network, remap=_uniformer_keys)
    # The ControlNet seg models were trained on maps made with the channels in BGR order (mmseg's pipeline
    # swapped the RGB input it was given); do the same so the classes come out as those models expect.
    bgr = img[:, :, ::-1].astype(np.float32)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    x = torch.from_numpy((bgr - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        labels = net(x.to(env.device)).argmax(1)[0].cpu().numpy()
    return np.asarray(ADE20K_PALETTE, dtype=np.uint8)[labels]


def _segmentation(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return remove_pad(segment_ade20k(padded, env_from(kw)))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "segmentation": (_segmentation, None),
}
