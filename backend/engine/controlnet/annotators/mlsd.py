"""M-LSD large straight lines (`mlsd_large_512_fp32.pth`): the network (MobileNetV2 front, upsampling decoder)
and the `mlsd` preprocessor, line segments in white on black with its value and distance thresholds."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, AnnotatorEnv, WeightFile, env_from

MLSD_WEIGHTS = WeightFile("mlsd_large_512_fp32.pth", "mlsd", ANNOTATORS_URL + "mlsd_large_512_fp32.pth")


def network():
    """M-LSD large: a MobileNetV2 front (TFLite-style padding) and an upsampling decoder, named as in the file."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin, cout, k=3, stride=1, groups=1):
            super().__init__(nn.Conv2d(cin, cout, k, stride, 0 if stride == 2 else (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
            self.stride = stride

        def forward(self, x):
            if self.stride == 2:
                x = F.pad(x, (0, 1, 0, 1))
            return super().forward(x)

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = int(round(cin * expand))
            self.residual = stride == 1 and cin == cout
            layers = [ConvBNReLU(cin, hidden, 1)] if expand != 1 else []
            layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                       nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            features, cin = [ConvBNReLU(4, 32, stride=2)], 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)):
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            self.features = nn.Sequential(*features)

        def forward(self, x):
            taps = []
            for i, f in enumerate(self.features):
                x = f(x)
                if i in (1, 3, 6, 10, 13):
                    taps.append(x)
            return taps

    def cbr(cin, cout, k, **kw):
        return nn.Sequential(nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Merge(nn.Module):  # "type A": 1x1 both inputs, upsample the deep one, concatenate
        def __init__(self, c_skip, c_deep, upscale=True):
            super().__init__()
            self.conv1 = cbr(c_deep, 64, 1)
            self.conv2 = cbr(c_skip, 64, 1)
            self.upscale = upscale

        def forward(self, skip, deep):
            deep = self.conv1(deep)
            if self.upscale:
                deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
            return torch.cat((self.conv2(skip), deep), 1)

    class Refine(nn.Module):  # "type B"
        def __init__(self):
            super().__init__()
            self.conv1 = cbr(128, 128, 3, padding=1)
            self.conv2 = cbr(128, 64, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.conv1(x) + x)

    class Head(nn.Module):  # "type C"
        def __init__(self):
            super().__init__()
            self.conv1 = cbr(64, 64, 3, padding=5, dilation=5)
            self.conv2 = cbr(64, 64, 3, padding=1)
            self.conv3 = nn.Conv2d(64, 16, 1)

        def forward(self, x):
            return self.conv3(self.conv2(self.conv1(x)))

    class MLSD(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.block15, self.block16 = Merge(64, 96, upscale=False), Refine()
            self.block17, self.block18 = Merge(32, 64), Refine()
            self.block19, self.block20 = Merge(24, 64), Refine()
            self.block21, self.block22 = Merge(16, 64), Refine()
            self.block23 = Head()

        def forward(self, x):
            c1, c2, c3, c4, c5 = self.backbone(x)
            x = self.block16(self.block15(c4, c5))
            x = self.block18(self.block17(c3, x))
            x = self.block20(self.block19(c2, x))
            x = self.block22(self.block21(c1, x))
            return self.block23(x)[:, 7:]

    return MLSD()


def mlsd_lines(img: np.ndarray, env: AnnotatorEnv, score_thr: float, dist_thr: float) -> np.ndarray:
    """Straight line segments (white, 1 px, on black) from M-LSD's center/displacement maps."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    net = env.load("mlsd", MLSD_WEIGHTS, "mlsd", network)
    h, w = img.shape[:2]
    x = np.concatenate([img.astype(np.float32), np.ones((h, w, 1), np.float32)], axis=2) / 127.5 - 1.0
    with torch.no_grad():
        out = net(torch.from_numpy(x).permute(2, 0, 1)[None].to(env.device)).float().cpu()
    center, disp = out[0, 0], out[0, 1:5].permute(1, 2, 0).numpy()
    heat = torch.sigmoid(center)[None, None]
    keep = (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).float()
    flat = (heat * keep).reshape(-1)
    scores, idx = torch.topk(flat, min(200, flat.numel()))
    mw = center.shape[1]
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    sy, sx = h / (2 * center.shape[0]), w / (2 * center.shape[1])
    for score, i in zip(scores.tolist(), idx.tolist()):
        yy, xx = divmod(i, mw)
        d = disp[yy, xx]
        if score <= score_thr or np.hypot(d[0] - d[2], d[1] - d[3]) <= dist_thr:
            continue
        x0, y0, x1, y1 = (xx + d[0]) * 2 * sx, (yy + d[1]) * 2 * sy, (xx + d[2]) * 2 * sx, (yy + d[3]) * 2 * sy
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=1)
    return np.asarray(canvas)


def _mlsd(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(mlsd_lines(padded, env_from(kw), float(a), float(b))))


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "mlsd": (_mlsd, None),
}
