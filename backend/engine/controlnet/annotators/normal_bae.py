"""Normal BAE surface normals (`scannet.pt`): EfficientNet-B5 and a refinement decoder, and the `normal_bae`
preprocessor, normals encoded as RGB."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, AnnotatorEnv, WeightFile, env_from

NORMAL_BAE_WEIGHTS = WeightFile("scannet.pt", "normal_bae", ANNOTATORS_URL + "scannet.pt")


def network():
    """Bae et al.'s surface-normal network: EfficientNet-B5 (TF "same" padding, BN eps 1e-3) and a decoder that
    refines a 1/8-resolution prediction at 1/4, 1/2 and full resolution. Keys as in `scannet.pt`
    (`encoder.original_model.*` in gen-efficientnet names, `decoder.*`)."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class SameConv(nn.Conv2d):
        """Conv2d with TensorFlow's "same" padding (asymmetric for stride 2)."""

        def forward(self, x):
            ih, iw = x.shape[-2:]
            kh, kw = self.kernel_size
            sh, sw = self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def conv(cin, cout, k, stride=1, groups=1):
        return SameConv(cin, cout, k, stride, groups=groups, bias=False)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3)

    class SqueezeExcite(nn.Module):
        def __init__(self, c, reduced):
            super().__init__()
            self.conv_reduce = nn.Conv2d(c, reduced, 1)
            self.conv_expand = nn.Conv2d(reduced, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))

    class DepthwiseSeparable(nn.Module):
        def __init__(self, cin, cout, k, stride):
            super().__init__()
            self.conv_dw, self.bn1 = conv(cin, cin, k, stride, groups=cin), bn(cin)
            self.se = SqueezeExcite(cin, max(1, int(cin * 0.25)))
            self.conv_pw, self.bn2 = conv(cin, cout, 1), bn(cout)
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
            return x + y if self.skip else y

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, k, stride, expand=6):
            super().__init__()
            mid = cin * expand
            self.conv_pw, self.bn1 = conv(cin, mid, 1), bn(mid)
            self.conv_dw, self.bn2 = conv(mid, mid, k, stride, groups=mid), bn(mid)
            self.se = SqueezeExcite(mid, max(1, int(cin * 0.25)))
            self.conv_pwl, self.bn3 = conv(mid, cout, 1), bn(cout)
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            y = F.silu(self.bn1(self.conv_pw(x)))
            y = F.silu(self.bn2(self.conv_dw(y)))
            y = self.bn3(self.conv_pwl(self.se(y)))
            return x + y if self.skip else y

    class EfficientNetB5(nn.Module):
        # (block kind, repeats, kernel, stride, out channels) for width 1.6 / depth 2.2
        STAGES = [("ds", 3, 3, 1, 24), ("ir", 5, 3, 2, 40), ("ir", 5, 5, 2, 64), ("ir", 7, 3, 2, 128),
                  ("ir", 7, 5, 1, 176), ("ir", 9, 5, 2, 304), ("ir", 3, 3, 1, 512)]

        def __init__(self):
            super().__init__()
            self.conv_stem, self.bn1 = conv(3, 48, 3, 2), bn(48)
            stages, cin = [], 48
            for kind, repeats, k, stride, cout in self.STAGES:
                blocks = []
                for i in range(repeats):
                    block = DepthwiseSeparable if kind == "ds" else InvertedResidual
                    blocks.append(block(cin, cout, k, stride if i == 0 else 1))
                    cin = cout
                stages.append(nn.Sequential(*blocks))
            self.blocks = nn.Sequential(*stages)
            self.conv_head, self.bn2 = conv(512, 2048, 1), bn(2048)

        def forward(self, x):
            x = F.silu(self.bn1(self.conv_stem(x)))
            taps = []
            for stage in self.blocks:
                x = stage(x)
                taps.append(x)
            return taps[0], taps[1], taps[2], taps[4], self.conv_head(x)  # 24, 40, 64, 176, 2048 channels

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.original_model = EfficientNetB5()

    class UpSampleBN(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self._net = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU())

        def forward(self, x, skip):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
            return self._net(torch.cat([x, skip], 1))

    def head(cin):
        return nn.Sequential(nn.Conv1d(cin, 128, 1), nn.ReLU(), nn.Conv1d(128, 128, 1), nn.ReLU(),
                             nn.Conv1d(128, 128, 1), nn.ReLU(), nn.Conv1d(128, 4, 1))

    def normalize(out):
        xyz, kappa = out[:, :3], out[:, 3:]
        norm = torch.sqrt((xyz ** 2).sum(1, keepdim=True)) + 1e-10
        return torch.cat([xyz / norm, F.elu(kappa) + 1.01], 1)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(2048, 2048, 1)
            self.up1, self.up2 = UpSampleBN(2048 + 176, 1024), UpSampleBN(1024 + 64, 512)
            self.up3, self.up4 = UpSampleBN(512 + 40, 256), UpSampleBN(256 + 24, 128)
            self.out_conv_res8 = nn.Conv2d(512, 4, 3, 1, 1)
            self.out_conv_res4, self.out_conv_res2, self.out_conv_res1 = head(512 + 4), head(256 + 4), head(128 + 4)

        @staticmethod
        def refine(net, feats, coarse):
            """Every pixel of the 2x finer level predicted from the upsampled features and coarse prediction."""
            f = F.interpolate(feats, scale_factor=2, mode="bilinear", align_corners=True)
            c = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)
            x = torch.cat([f, c], 1)
            b, ch, h, w = x.shape
            return normalize(net(x.view(b, ch, -1))).view(b, 4, h, w)

        def forward(self, taps):
            b0, b1, b2, b3, b4 = taps
            d0 = self.conv2(b4)
            d1 = self.up1(d0, b3)
            d2 = self.up2(d1, b2)
            d3 = self.up3(d2, b1)
            d4 = self.up4(d3, b0)
            out8 = normalize(self.out_conv_res8(d2))
            out4 = self.refine(self.out_conv_res4, d2, out8)
            out2 = self.refine(self.out_conv_res2, d3, out4)
            return self.refine(self.out_conv_res1, d4, out2)

    class NormalBae(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder()
            self.decoder = Decoder()

        def forward(self, x):
            return self.decoder(self.encoder.original_model(x))

    return NormalBae()


def _normal_bae_keys(net, sd: dict) -> dict:
    """scannet.pt keeps its weights under "model", sometimes with DataParallel's `module.` prefix."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def normal_bae(img: np.ndarray, env: AnnotatorEnv) -> np.ndarray:
    """Surface normals as RGB ((n + 1) / 2 * 255), at the image's size (a multiple of 32 on each side)."""
    import torch
    net = env.load("normal_bae", NORMAL_BAE_WEIGHTS, "normal_bae", network, remap=_normal_bae_keys,
                   unwrap="model")
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        normal = net(((x - mean) / std).to(env.device))[0, :3].float().cpu()
    normal = ((normal + 1) * 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (normal * 255.0).clip(0, 255).astype(np.uint8)


def _normal_bae(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return remove_pad(normal_bae(padded, env_from(kw)))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "normal_bae": (_normal_bae, None),
}
