"""Model-based ControlNet preprocessors ("annotators"): their networks, weights and post-processing.

Implemented (network definitions written here, loading the public weight files sd-webui-controlnet
uses; key names follow those files):
- `softedge_hed` (internal name `hed`), `softedge_hedsafe` (`hed_safe`), `scribble_hed`: HED soft
  edges, `ControlNetHED.pth` (ControlNet 1.1's Apache-2.0 HED);
- `lineart_realistic` (`lineart`) and `lineart_coarse`: the line generator, `sk_model.pth` / `sk_model2.pth`;
- `openpose` (body only): the CMU body pose network, `body_pose_model.pth`, with part-affinity-field
  assembly of people and ControlNet's OpenPose drawing;
- `mlsd`: M-LSD large straight lines, `mlsd_large_512_fp32.pth`;
- `depth_anything`: DINOv2 ViT + DPT head, `depth_anything_vitl14.pth` (sized from the file);
- `normal_bae`: EfficientNet-B5 + refinement decoder surface normals, `scannet.pt`;
- `seg_ufade20k` (`segmentation`): UniFormer-S + UperNet ADE20K segmentation, `upernet_global_small.pth`,
  painted in the ADE20K palette.

Weights are looked for in `models/ControlNet-annotators/` (also in a sub-folder named after the
annotator, as sd-webui-controlnet's `annotator/downloads/<name>/` lays them out). When missing,
they are downloaded on first use with a progress bar; offline, a `UserError` names the missing
file, where it comes from, and where to put it. Files load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from backend.core.errors import UserError
from backend.engine.controlnet.preprocessors import hwc3, resize_with_pad

log = logging.getLogger("easel.annotators")

ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    subfolder: str  # sd-webui-controlnet's downloads/<subfolder>/
    url: str


HED_WEIGHTS = WeightFile("ControlNetHED.pth", "hed", ANNOTATORS_URL + "ControlNetHED.pth")
LINEART_WEIGHTS = WeightFile("sk_model.pth", "lineart", ANNOTATORS_URL + "sk_model.pth")
LINEART_COARSE_WEIGHTS = WeightFile("sk_model2.pth", "lineart", ANNOTATORS_URL + "sk_model2.pth")
LINEART_ANIME_WEIGHTS = WeightFile("netG.pth", "lineart_anime", ANNOTATORS_URL + "netG.pth")


@dataclass
class AnnotatorEnv:
    """Where annotator weights live and run: the folder, the device, whether downloads are allowed."""

    folder: Path
    device: str = "cpu"
    allow_download: bool = True
    progress: Callable[[int, int], None] | None = None
    models: dict = field(default_factory=dict)

    def find(self, weights: WeightFile) -> Path | None:
        for candidate in (self.folder / weights.filename, self.folder / weights.subfolder / weights.filename):
            if candidate.is_file():
                return candidate
        return None

    def weights_path(self, weights: WeightFile, what: str) -> Path:
        found = self.find(weights)
        if found is not None:
            return found
        target = self.folder / weights.filename
        hint = (f"The {what} preprocessor needs {weights.filename}, which is not in {self.folder}. "
                f"Download it from {weights.url} and put it at {target}")
        from backend.downloads import download_file, network_available
        if not self.allow_download:
            raise UserError(hint + ".", status=424)
        if not network_available(weights.url):
            raise UserError(hint + " (no internet connection was found to download it now).", status=424)
        log.info("downloading %s for the %s preprocessor", weights.filename, what)
        try:
            return download_file(weights.url, target, self.progress)
        except UserError as exc:
            raise UserError(f"{hint}. The automatic download failed: {exc.message}", status=424) from exc

    def load(self, key: str, weights: WeightFile, what: str, build: Callable, remap: Callable | None = None,
             sized: bool = False, unwrap: str | None = None):
        """The network `build()` (`build(sd)` when `sized`: shaped from the file) with the weights of `weights`
        loaded, cached per env; `remap(net, sd)` renames keys."""
        if key not in self.models:
            self.models.clear()  # one annotator network in memory at a time (some are 1 GB and more)
            import torch

            from backend.engine.state_dict_io import read_state_dict
            path = self.weights_path(weights, what)
            sd = _read_nested(path, unwrap) if unwrap else read_state_dict(path)
            try:
                net = build(sd) if sized else build()
            except (KeyError, ValueError, IndexError) as exc:
                raise UserError(f"{path.name} does not fit the {what} network ({type(exc).__name__}: {exc}). "
                                f"The file may be damaged; delete it and try again.") from exc
            if remap is not None:
                sd = remap(net, sd)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise UserError(f"{path.name} does not fit the {what} network (missing {len(missing)}, unexpected "
                                f"{len(unexpected)} tensors, e.g. {', '.join(list(missing)[:2] + list(unexpected)[:2])}). "
                                f"The file may be damaged; delete it and try again.")
            net.eval().requires_grad_(False).to(self.device, torch.float32)
            self.models[key] = net
        return self.models[key]


def _read_nested(path: Path, key: str) -> dict:
    """The tensors under `key` of a checkpoint dict (e.g. {"model": state_dict, ...}), loaded with weights_only."""
    import torch

    from backend.engine.state_dict_io import read_state_dict, safe_unpickle_globals
    if path.suffix.lower() == ".safetensors":
        return read_state_dict(path)
    try:
        with torch.serialization.safe_globals(safe_unpickle_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  damaged file or pickled code: refused either way
        raise UserError(f"Could not read {path.name} safely ({type(exc).__name__}: {str(exc)[:200]}). Delete it and "
                        f"download it again.") from exc
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _env(kwargs) -> AnnotatorEnv:
    env = kwargs.get("env")
    if env is None:
        raise UserError("Model-based preprocessors run in the backend (no annotator folder was given).")
    return env


# -- HED ------------------------------------------------------------------------------------------
def _hed_network():
    import torch
    from torch import nn

    class ConvStage(nn.Module):
        """`layers` 3x3 conv + ReLU, with a 1x1 side output (named as in ControlNetHED.pth)."""

        def __init__(self, cin: int, cout: int, layers: int):
            super().__init__()
            self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
            self.projection = nn.Conv2d(cout, 1, 1)

        def forward(self, x, pool: bool):
            if pool:
                x = torch.nn.functional.max_pool2d(x, 2, 2)
            for conv in self.convs:
                x = torch.relu(conv(x))
            return x, self.projection(x)

    class HED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            self.block1 = ConvStage(3, 64, 2)
            self.block2 = ConvStage(64, 128, 2)
            self.block3 = ConvStage(128, 256, 3)
            self.block4 = ConvStage(256, 512, 3)
            self.block5 = ConvStage(512, 512, 3)

        def forward(self, x):
            h = x - self.norm
            sides = []
            for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
                h, side = block(h, i > 0)
                sides.append(side)
            return sides

    return HED()


def hed_edges(img: np.ndarray, env: AnnotatorEnv, *, safe: bool = False) -> np.ndarray:
    """Soft edges in 0..255 (H, W) uint8: the sigmoid of the mean of HED's five upsampled side outputs."""
    import torch
    import torch.nn.functional as F
    net = env.load("hed", HED_WEIGHTS, "HED soft edge", _hed_network)
    h, w = img.shape[:2]
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None].to(env.device)
    with torch.no_grad():
        sides = [F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False) for s in net(x)]
        edge = torch.sigmoid(torch.stack(sides).mean(dim=0))[0, 0].cpu().numpy()
    if safe:  # quantize to 3 levels, as "hed_safe" does, so the map carries less of the image
        edge = np.floor(edge * 3.0) / 2.0
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def _hed(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(hed_edges(padded, _env(kw))))


def _hed_safe(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(hed_edges(padded, _env(kw), safe=True)))


def _scribble_hed(img, res, a, b, seed, **kw):
    """HED edges thinned to strokes: non-maximum suppression, threshold, and a little dilation."""
    padded, remove_pad = resize_with_pad(img, res)
    edge = hed_edges(padded, _env(kw)).astype(np.float32)
    from backend.engine.controlnet.preprocessors import gaussian_blur
    smooth = gaussian_blur(edge, 3.0)
    keep = np.zeros_like(smooth, dtype=bool)
    p = np.pad(smooth, 1, mode="edge")
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        n1 = p[1 + dy:1 + dy + smooth.shape[0], 1 + dx:1 + dx + smooth.shape[1]]
        n2 = p[1 - dy:1 - dy + smooth.shape[0], 1 - dx:1 - dx + smooth.shape[1]]
        keep |= (smooth >= n1) & (smooth >= n2)
    strokes = ((keep & (smooth > 127)) * 255).astype(np.float32)
    thick = gaussian_blur(strokes, 3.0)
    dilated = (thick > 4).astype(np.uint8)
    return hwc3(remove_pad(dilated * 255))


# -- lineart ----------------------------------------------------------------------------------------
def _lineart_network():
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(True),
                                            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

        def forward(self, x):
            return x + self.conv_block(x)

    class LineGenerator(nn.Module):
        """Encoder (7x7, two stride-2 convs), 3 residual blocks, decoder (two transposed convs), 7x7 + sigmoid."""

        def __init__(self):
            super().__init__()
            self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(True))
            self.model1 = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.InstanceNorm2d(128), nn.ReLU(True),
                                        nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.InstanceNorm2d(256), nn.ReLU(True))
            self.model2 = nn.Sequential(*[Residual(256) for _ in range(3)])
            self.model3 = nn.Sequential(
                nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(128), nn.ReLU(True),
                nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(64), nn.ReLU(True))
            self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

        def forward(self, x):
            return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))

    return LineGenerator()


def lineart_lines(img: np.ndarray, env: AnnotatorEnv, *, coarse: bool = False) -> np.ndarray:
    """White lines on black (H, W) uint8 from the line generator (which draws black lines on white)."""
    import torch
    weights = LINEART_COARSE_WEIGHTS if coarse else LINEART_WEIGHTS
    net = env.load("lineart_coarse" if coarse else "lineart", weights, "lineart" + (" coarse" if coarse else ""),
                   _lineart_network)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(env.device)
    with torch.no_grad():
        line = net(x)[0, 0].cpu().numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


def _lineart(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, _env(kw))))


def _lineart_coarse(img, res, a, b, seed, **kw):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(lineart_lines(padded, _env(kw), coarse=True)))


# -- lineart_anime: a pix2pix U-Net (8 downsamplings, 64 base channels, instance norm) ------------------
def _lineart_anime_network():
    import torch
    from torch import nn

    class Skip(nn.Module):
        """One level of the U-Net: down, the inner levels, up; its input is concatenated to its output
        except at the outermost level. The layer order fixes the weight names of `netG.pth`."""

        def __init__(self, outer: int, inner: int, sub: nn.Module | None = None, in_channels: int | None = None,
                     outermost: bool = False):
            super().__init__()
            self.outermost = outermost
            down = nn.Conv2d(in_channels or outer, inner, 4, 2, 1, bias=True)
            if outermost:
                layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
            elif sub is None:  # innermost
                layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=True),
                          nn.InstanceNorm2d(outer)]
            else:
                layers = [nn.LeakyReLU(0.2, True), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(True),
                          nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=True), nn.InstanceNorm2d(outer)]
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)

    class UnetGenerator(nn.Module):
        def __init__(self, ngf: int = 64, num_downs: int = 8):
            super().__init__()
            block = Skip(ngf * 8, ngf * 8)
            for _ in range(num_downs - 5):
                block = Skip(ngf * 8, ngf * 8, block)
            block = Skip(ngf * 4, ngf * 8, block)
            block = Skip(ngf * 2, ngf * 4, block)
            block = Skip(ngf, ngf * 2, block)
            self.model = Skip(1, ngf, block, in_channels=3, outermost=True)

        def forward(self, x):
            return self.model(x)

    return UnetGenerator()


def _lineart_anime_keys(net, sd: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _lineart_anime(img, res, a, b, seed, **kw):
    """White lines on black from the anime line model (which draws black lines on white, in -1..1), run at
    multiples of 256 pixels as its eight halvings need."""
    import torch
    env = _env(kw)
    net = env.load("lineart_anime", LINEART_ANIME_WEIGHTS, "lineart_anime", _lineart_anime_network,
                   remap=_lineart_anime_keys)
    padded, remove_pad = resize_with_pad(img, res)
    h, w = padded.shape[:2]
    hn, wn = -(-h // 256) * 256, -(-w // 256) * 256
    x = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = _resize_maps(x, hn, wn).to(env.device)
    with torch.no_grad():
        line = net(x)[:, :1].float().cpu() * 127.5 + 127.5
    line = _resize_maps(line, h, w)[0, 0].numpy().clip(0, 255).astype(np.uint8)
    return hwc3(remove_pad(255 - line))


# -- OpenPose (body) -------------------------------------------------------------------------------
# COCO-18 keypoints; limbs as pairs of 1-based keypoint numbers, the PAF channels (x, y) of each, and
# the colours ControlNet's OpenPose models were trained with.
POSE_LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
              (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
POSE_PAF = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
            (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
POSE_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
OPENPOSE_BODY_WEIGHTS = WeightFile("body_pose_model.pth", "openpose", ANNOTATORS_URL + "body_pose_model.pth")


def _openpose_network():
    """The CMU body pose network (VGG-19 front, 6 two-branch stages: 38 PAF and 19 heatmap channels).

    Layers are named as in `body_pose_model.pth` (conv1_1 ... Mconv7_stage6_L2), each file key being
    this module's key without its first component (`model0.conv1_1.weight` <- `conv1_1.weight`).
    """
    from collections import OrderedDict

    import torch
    from torch import nn

    def seq(spec, last_plain: str):
        layers = []
        for name, v in spec:
            if name.startswith("pool"):
                layers.append((name, nn.MaxPool2d(2, 2)))
            else:
                layers.append((name, nn.Conv2d(v[0], v[1], v[2], 1, v[2] // 2)))
                if name != last_plain:
                    layers.append(("relu_" + name, nn.ReLU(inplace=True)))
        return nn.Sequential(OrderedDict(layers))

    front = [("conv1_1", (3, 64, 3)), ("conv1_2", (64, 64, 3)), ("pool1_stage1", None), ("conv2_1", (64, 128, 3)),
             ("conv2_2", (128, 128, 3)), ("pool2_stage1", None), ("conv3_1", (128, 256, 3)), ("conv3_2", (256, 256, 3)),
             ("conv3_3", (256, 256, 3)), ("conv3_4", (256, 256, 3)), ("pool3_stage1", None), ("conv4_1", (256, 512, 3)),
             ("conv4_2", (512, 512, 3)), ("conv4_3_CPM", (512, 256, 3)), ("conv4_4_CPM", (256, 128, 3))]

    class BodyPose(nn.Module):
        def __init__(self):
            super().__init__()
            self.model0 = seq(front, "")
            for branch, out in ((1, 38), (2, 19)):
                setattr(self, f"model1_{branch}", seq(
                    [(f"conv5_{i}_CPM_L{branch}", (128, 128, 3)) for i in (1, 2, 3)]
                    + [(f"conv5_4_CPM_L{branch}", (128, 512, 1)), (f"conv5_5_CPM_L{branch}", (512, out, 1))],
                    f"conv5_5_CPM_L{branch}"))
                for stage in range(2, 7):
                    spec = [(f"Mconv1_stage{stage}_L{branch}", (185, 128, 7))]
                    spec += [(f"Mconv{i}_stage{stage}_L{branch}", (128, 128, 7)) for i in (2, 3, 4, 5)]
                    spec += [(f"Mconv6_stage{stage}_L{branch}", (128, 128, 1)),
                             (f"Mconv7_stage{stage}_L{branch}", (128, out, 1))]
                    # the original leaves a ReLU after Mconv7_stage6_L2 (its list names stage6_L1 twice)
                    plain = "" if (stage == 6 and branch == 2) else f"Mconv7_stage{stage}_L{branch}"
                    setattr(self, f"model{stage}_{branch}", seq(spec, plain))

        def forward(self, x):
            feats = self.model0(x)
            paf, heat = self.model1_1(feats), self.model1_2(feats)
            for stage in range(2, 7):
                h = torch.cat([paf, heat, feats], 1)
                paf, heat = getattr(self, f"model{stage}_1")(h), getattr(self, f"model{stage}_2")(h)
            return paf, heat

    return BodyPose()


def _openpose_keys(net, sd: dict) -> dict:
    """`conv1_1.weight` (file) -> `model0.conv1_1.weight` (module); files already in module names pass through."""
    own = net.state_dict().keys()
    if set(sd) & set(own):
        return sd
    return {k: sd[k.split(".", 1)[1]] for k in own if k.split(".", 1)[1] in sd}


def _resize_maps(x, height: int, width: int):
    import torch.nn.functional as F
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)


def openpose_body(img: np.ndarray, env: AnnotatorEnv) -> list[list[tuple[float, float] | None]]:
    """People found in an RGB image: per person 18 keypoints as (x, y) pixel positions, or None where not found.

    Heatmaps and part-affinity fields at one scale (368 px boxes, stride 8), peaks of the smoothed
    heatmaps above 0.1, limbs scored along their PAF (10 samples, 80% above 0.05, a distance prior),
    greedy matching, then people assembled limb by limb; people with fewer than 4 parts or a mean
    score below 0.4 are dropped (the rules of the original OpenPose/pytorch-openpose code).
    """
    import torch
    net = env.load("openpose_body", OPENPOSE_BODY_WEIGHTS, "openpose", _openpose_network, remap=_openpose_keys)
    h0, w0 = img.shape[:2]
    scale = 368.0 / h0
    bgr = np.ascontiguousarray(img[:, :, ::-1]).astype(np.float32)
    sh, sw = max(8, int(round(h0 * scale))), max(8, int(round(w0 * scale)))
    x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
    x = _resize_maps(x, sh, sw)
    ph, pw = -sh % 8, -sw % 8
    x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=128.0)
    with torch.no_grad():
        paf, heat = net((x / 256.0 - 0.5).to(env.device))
        heat = _resize_maps(heat.float().cpu(), (sh + ph), (sw + pw))[:, :, :sh, :sw]
        paf = _resize_maps(paf.float().cpu(), (sh + ph), (sw + pw))[:, :, :sh, :sw]
        heat = _resize_maps(heat, h0, w0)[0].permute(1, 2, 0).numpy()
        paf = _resize_maps(paf, h0, w0)[0].permute(1, 2, 0).numpy()
    return _assemble_people(heat, paf, h0)


def _assemble_people(heat: np.ndarray, paf: np.ndarray, height: int) -> list:
    from backend.engine.controlnet.preprocessors import gaussian_blur
    peaks = []  # per part: [(x, y, score, id)]
    counter = 0
    for part in range(18):
        raw = heat[:, :, part]
        m = gaussian_blur(raw, 3.0)
        p = np.pad(m, 1)
        c = p[1:-1, 1:-1]
        found = (c >= p[1:-1, :-2]) & (c >= p[1:-1, 2:]) & (c >= p[:-2, 1:-1]) & (c >= p[2:, 1:-1]) & (c > 0.1)
        ys, xs = np.nonzero(found)
        peaks.append([(int(x), int(y), float(raw[y, x]), counter + i) for i, (x, y) in enumerate(zip(xs, ys))])
        counter += len(xs)
    candidates = [pk for part in peaks for pk in part]
    connections: list = []
    for k, ((a, b), (px, py)) in enumerate(zip(POSE_LIMBS, POSE_PAF)):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            connections.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.array([pb[0] - pa[0], pb[1] - pa[1]], dtype=np.float64)
                norm = max(0.001, float(np.hypot(*vec)))
                vec /= norm
                xs = np.round(np.linspace(pa[0], pb[0], 10)).astype(int)
                ys = np.round(np.linspace(pa[1], pb[1], 10)).astype(int)
                along = paf[ys, xs, px] * vec[0] + paf[ys, xs, py] * vec[1]
                score = float(along.mean()) + min(0.5 * height / norm - 1, 0)
                if (along > 0.05).sum() > 0.8 * len(along) and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda t: t[2], reverse=True)
        chosen, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i in used_a or j in used_b:
                continue
            chosen.append((cand_a[i][3], cand_b[j][3], score))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(cand_a), len(cand_b)):
                break
        connections.append(chosen)

    people: list[np.ndarray] = []  # rows: 18 candidate ids, total score, part count
    for k, chosen in enumerate(connections):
        if not chosen:
            continue
        ia, ib = POSE_LIMBS[k][0] - 1, POSE_LIMBS[k][1] - 1
        for id_a, id_b, score in chosen:
            hits = [n for n, row in enumerate(people) if row[ia] == id_a or row[ib] == id_b][:2]
            if len(hits) == 1:
                row = people[hits[0]]
                if row[ib] != id_b:
                    row[ib] = id_b
                    row[19] += 1
                    row[18] += candidates[id_b][2] + score
            elif len(hits) == 2:
                r1, r2 = people[hits[0]], people[hits[1]]
                overlap = ((r1[:18] >= 0) & (r2[:18] >= 0)).any()
                if not overlap:
                    r1[:18] += r2[:18] + 1
                    r1[18:] += r2[18:]
                    r1[18] += score
                    del people[hits[1]]
                else:
                    r1[ib] = id_b
                    r1[19] += 1
                    r1[18] += candidates[id_b][2] + score
            elif k < 17:
                row = -np.ones(20)
                row[ia], row[ib] = id_a, id_b
                row[19] = 2
                row[18] = candidates[id_a][2] + candidates[id_b][2] + score
                people.append(row)
    out = []
    for row in people:
        if row[19] < 4 or row[18] / row[19] < 0.4:
            continue
        out.append([None if row[i] < 0 else (float(candidates[int(row[i])][0]), float(candidates[int(row[i])][1]))
                    for i in range(18)])
    return out


def draw_pose(people: list, width: int, height: int) -> np.ndarray:
    """People as ControlNet's OpenPose models expect them: coloured limbs (ellipses at 60%) and joints, on black."""
    import math

    from PIL import Image, ImageDraw
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for person in people:
        for (a, b), color in zip(POSE_LIMBS, POSE_COLORS):
            p1, p2 = person[a - 1], person[b - 1]
            if p1 is None or p2 is None:
                continue
            cx, cy = (p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2
            length = math.hypot(p1[0] - p2[0], p1[1] - p2[1]) / 2
            angle = math.atan2(p1[1] - p2[1], p1[0] - p2[0])
            pts = [(cx + length * math.cos(t) * math.cos(angle) - 4 * math.sin(t) * math.sin(angle),
                    cy + length * math.cos(t) * math.sin(angle) + 4 * math.sin(t) * math.cos(angle))
                   for t in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
            draw.polygon(pts, fill=tuple(int(c * 0.6) for c in color))
        for point, color in zip(person, POSE_COLORS):
            if point is not None:
                draw.ellipse((point[0] - 4, point[1] - 4, point[0] + 4, point[1] + 4), fill=color)
    return np.asarray(canvas)


def pose_json(people: list, width: int, height: int) -> dict:
    """People in the OpenPose JSON format sd-webui-controlnet's detect returns (and pose editors read):
    `pose_keypoints_2d` = 18 x [x, y, confidence], x and y as fractions of the canvas, [0, 0, 0] where not found."""
    def flat(person):
        return [v for p in person for v in ((p[0] / width, p[1] / height, 1.0) if p is not None else (0.0, 0.0, 0.0))]

    return {"people": [{"pose_keypoints_2d": flat(person), "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
                        "hand_right_keypoints_2d": None} for person in people],
            "canvas_width": int(width), "canvas_height": int(height)}


def _openpose_with_json(img, res, a, b, seed, **kw) -> tuple[np.ndarray, dict]:
    padded, remove_pad = resize_with_pad(img, res)
    people = openpose_body(padded, _env(kw))
    drawn = remove_pad(draw_pose(people, padded.shape[1], padded.shape[0]))
    return drawn, pose_json(people, drawn.shape[1], drawn.shape[0])


def _openpose(img, res, a, b, seed, **kw):
    return _openpose_with_json(img, res, a, b, seed, **kw)[0]


# -- M-LSD straight lines ---------------------------------------------------------------------------
MLSD_WEIGHTS = WeightFile("mlsd_large_512_fp32.pth", "mlsd", ANNOTATORS_URL + "mlsd_large_512_fp32.pth")


def _mlsd_network():
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
    net = env.load("mlsd", MLSD_WEIGHTS, "mlsd", _mlsd_network)
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
    return hwc3(remove_pad(mlsd_lines(padded, _env(kw), float(a), float(b))))


# -- Depth Anything ---------------------------------------------------------------------------------
DEPTH_ANYTHING_WEIGHTS = WeightFile(
    "depth_anything_vitl14.pth", "depth_anything",
    "https://huggingface.co/spaces/LiheYoung/Depth-Anything/resolve/main/checkpoints/depth_anything_vitl14.pth")


def _depth_anything_network(sd: dict | None = None):
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
    net = env.load("depth_anything", DEPTH_ANYTHING_WEIGHTS, "depth_anything", _depth_anything_network, sized=True)
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
    return hwc3(remove_pad(depth_anything(padded, _env(kw))))


# -- Normal BAE ------------------------------------------------------------------------------------
NORMAL_BAE_WEIGHTS = WeightFile("scannet.pt", "normal_bae", ANNOTATORS_URL + "scannet.pt")


def _normal_bae_network():
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
    net = env.load("normal_bae", NORMAL_BAE_WEIGHTS, "normal_bae", _normal_bae_network, remap=_normal_bae_keys,
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
    return remove_pad(normal_bae(padded, _env(kw)))


# -- Segmentation: UniFormer-S + UperNet on ADE20K -------------------------------------------------
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


def _uniformer_network():
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
    net = env.load("uniformer", UNIFORMER_WEIGHTS, "segmentation", _uniformer_network, remap=_uniformer_keys)
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
    return remove_pad(segment_ade20k(padded, _env(kw)))


# name -> (run, run with poses or None): the model-based entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "hed": (_hed, None), "hed_safe": (_hed_safe, None), "scribble_hed": (_scribble_hed, None),
    "lineart": (_lineart, None), "lineart_coarse": (_lineart_coarse, None), "lineart_anime": (_lineart_anime, None),
    "openpose": (_openpose, _openpose_with_json), "mlsd": (_mlsd, None), "depth_anything": (_depth_anything, None),
    "normal_bae": (_normal_bae, None), "segmentation": (_segmentation, None),
}
