"""Depth Anything (`depth_anything_vitl14.pth`): a DINOv2 ViT and a DPT head, sized from the weight file, and the
`depth_anything` preprocessor, relative depth with near as bright."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad
from backend.engine.controlnet.annotators.common import AnnotatorEnv, WeightFile, env_from

DEPTH_ANYTHING_WEIGHTS = WeightFile(
    "depth_anything_vitl14.pth", "depth_anything",
    "https://huggingface.co/spaces/LiheYoung/Depth-Anything/resolve/main/checkpoints/depth_anything_vitl14.pth")


def network(sd: dict | None = None):
    """Depth Anything: a DINOv2 ViT (patch 14, layer scale) and a DPT head, sized from the weight file.

    Keys as in `depth_anything_vitl14.pth`: `pretrained.*` (cls_token, pos_embed, mask_token,
    patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma},
    norm) and `depth_head.*` (projects, resize_layers, scratch.layerN_rn, scratch.refinenetN, output convs).
    """
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    embed, depth, positions = 1024, 24, 1370
    out_ch, features = [256, 512, 1024, 1024], 256
    if sd is not None:
        embed = int(sd["pretrained.cls_token"].shape[-1])
        positions = int(sd["pretrained.pos_embed"].shape[1])
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks."))
        out_ch = [int(sd[f"depth_head.projects.{i}.weight"].shape[0]) for i in range(4)]
        features = int(sd["depth_head.scratch.layer1_rn.weight"].shape[0])
    heads = max(1, embed // 64)
    taps = {24: [4, 11, 17, 23], 12: [2, 5, 8, 11], 40: [9, 19, 29, 39]}.get(
        depth, [round(i * (depth - 1) / 3) for i in range(4)])

    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * self.gamma

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(embed, 3 * embed)
            self.proj = nn.Linear(embed, embed)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(embed, 4 * embed)
            self.fc2 = nn.Linear(4 * embed, embed)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.ls1 = nn.LayerNorm(embed, eps=1e-6), Attention(), LayerScale(embed)
            self.norm2, self.mlp, self.ls2 = nn.LayerNorm(embed, eps=1e-6), Mlp(), LayerScale(embed)

        def forward(self, x):
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, embed, 14, 14)

    class DINOv2(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed))
            self.pos_embed = nn.Parameter(torch.zeros(1, positions, embed))
            self.mask_token = nn.Parameter(torch.zeros(1, embed))
            self.patch_embed = PatchEmbed()
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(embed, eps=1e-6)

        def features(self, x):
            b, _, h, w = x.shape
            gh, gw = h // 14, w // 14
            tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
            side = int(math.sqrt(positions - 1))
            pos = self.pos_embed.float()
            if (gh, gw) != (side, side):
                grid = pos[:, 1:].reshape(1, side, side, embed).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
                pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, embed)], 1)
            x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1) + pos.to(tokens.dtype)
            outs = []
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in taps:
                    outs.append(self.norm(x)[:, 1:])
            return outs, gh, gw

    class ResidualConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(features, features, 3, 1, 1)
            self.conv2 = nn.Conv2d(features, features, 3, 1, 1)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(F.relu(x)))) + x

    class Fusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.resConfUnit1, self.resConfUnit2 = ResidualConv(), ResidualConv()
            self.out_conv = nn.Conv2d(features, features, 1)

        def forward(self, x, skip=None, size=None):
            if skip is not None:
                x = x + self.resConfUnit1(skip)
            x = self.resConfUnit2(x)
            if size is None:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            return self.out_conv(x)

    class Scratch(nn.Module):
        def __init__(self):
            super().__init__()
            for i, c in enumerate(out_ch, 1):
                setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, 1, 1, bias=False))
                setattr(self, f"refinenet{i}", Fusion())
            self.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
            self.output_conv2 = nn.Sequential(nn.Conv2d(features // 2, 32, 3, 1, 1), nn.ReLU(True), nn.Conv2d(32, 1, 1),
                                              nn.ReLU(True), nn.Identity())

    class DPTHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.projects = nn.ModuleList([nn.Conv2d(embed, c, 1) for c in out_ch])
            self.resize_layers = nn.ModuleList([
                nn.ConvTranspose2d(out_ch[0], out_ch[0], 4, 4), nn.ConvTranspose2d(out_ch[1], out_ch[1], 2, 2),
                nn.Identity(), nn.Conv2d(out_ch[3], out_ch[3], 3, 2, 1)])
            self.scratch = Scratch()

        def forward(self, feats, gh, gw):
            layers = []
            for i, f in enumerate(feats):
                f = f.transpose(1, 2).reshape(f.shape[0], f.shape[-1], gh, gw)
                layers.append(getattr(self.scratch, f"layer{i + 1}_rn")(self.resize_layers[i](self.projects[i](f))))
            s = self.scratch
            p4 = s.refinenet4(layers[3], size=layers[2].shape[2:])
            p3 = s.refinenet3(p4, layers[2], size=layers[1].shape[2:])
            p2 = s.refinenet2(p3, layers[1], size=layers[0].shape[2:])
            p1 = s.refinenet1(p2, layers[0])
            out = F.interpolate(s.output_conv1(p1), (gh * 14, gw * 14), mode="bilinear", align_corners=True)
            return s.output_conv2(out)

    class DepthAnything(nn.Module):
        def __init__(self):
            super().__init__()
            self.pretrained = DINOv2()
            self.depth_head = DPTHead()

        def forward(self, x):
            feats, gh, gw = self.pretrained.features(x)
            return F.relu(self.depth_head(feats, gh, gw))[:, 0]

    return DepthAnything()


def depth_anything(img: np.ndarray, env: AnnotatorEnv) -> np.ndarray:
    """Relative depth (near = bright), min-max normalised to 0..255, at the image's size."""
    import torch
    import torch.nn.functional as F
    net = env.load("depth_anything", DEPTH_ANYTHING_WEIGHTS, "depth_anything", network, sized=True)
    h, w = img.shape[:2]
    scale = max(518 / h, 518 / w)

    def multiple(v: float) -> int:
        m = int(round(v / 14) * 14)
        return m if m >= 518 else int(np.ceil(v / 14) * 14)

    th, tw = multiple(h * scale), multiple(w * scale)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        d = net(((x - mean) / std).to(env.device)).float().cpu()
    d = F.interpolate(d[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    span = float(d.max() - d.min())
    d = (d - d.min()) / span * 255.0 if span > 0 else torch.zeros_like(d)
    return d.numpy().astype(np.uint8)


def _depth_anything(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(depth_anything(padded, env_from(kw))))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "depth_anything": (_depth_anything, None),
}
