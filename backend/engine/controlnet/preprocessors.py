"""Running the ControlNet preprocessors: those that need no weights, in numpy (no OpenCV), and the runner
of every preprocessor by name (the model-based ones live in the `annotators` package).

Each preprocessor takes an RGB uint8 image (H, W, 3) and returns the control map as RGB uint8,
following sd-webui-controlnet's behaviour: most first scale the image so its short side is the
preprocessor resolution (`resize_image_with_pad`: edge-padded to a multiple of 64 while working,
the padding cut off afterwards), so the map has the size of the scaled image.

What the preprocessors are called and which sliders they take is `backend.core.preprocessor_catalog`.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from backend.core.preprocessor_catalog import Preprocessor, find_preprocessor


# -- image helpers --------------------------------------------------------------------------------
def hwc3(x: np.ndarray) -> np.ndarray:
    """Any uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB (H, W, 3); alpha blended on white."""
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = x[:, :, None]
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1 - alpha)).clip(0, 255).round().astype(np.uint8)


def to_array(image: Image.Image) -> np.ndarray:
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return hwc3(np.asarray(image))


def resize_array(x: np.ndarray, width: int, height: int, *, nearest: bool = False) -> np.ndarray:
    """Resize an RGB uint8 array: area averaging when shrinking, bicubic when enlarging (as OpenCV is used)."""
    h, w = x.shape[:2]
    if (w, h) == (width, height):
        return x
    if nearest:
        method = Image.Resampling.NEAREST
    else:
        method = Image.Resampling.BOX if width * height < w * h else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(hwc3(x)).resize((width, height), method))


def resize_with_pad(x: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale so the short side is `resolution`, edge-pad to multiples of 64; returns (padded, remove_pad)."""
    x = hwc3(x)
    h, w = x.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = max(1, int(round(h * k))), max(1, int(round(w * k)))
    x = resize_array(x, tw, th)
    ph, pw = -th % 64, -tw % 64
    padded = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")

    def remove_pad(y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(y[:th, :tw])

    return padded, remove_pad


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float (H, W[, C]) array, kernel and borders as OpenCV's (reflect-101)."""
    if sigma <= 0:
        return x.astype(np.float32)
    radius = max(1, int(round(sigma * 4 * 2 + 1)) // 2)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(t ** 2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = x.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        r = min(radius, n - 1)
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect") if r > 0 else out
        acc = np.zeros_like(out)
        for i, kv in enumerate(kernel[radius - r: radius + r + 1]):
            acc += kv * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc / kernel[radius - r: radius + r + 1].sum()
    return out


def rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, rounded, as uint8 (OpenCV's RGB2GRAY)."""
    g = x[..., 0].astype(np.float32) * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return np.clip(np.round(g), 0, 255).astype(np.uint8)


# -- Canny ----------------------------------------------------------------------------------------
_TAN_22_5 = np.tan(np.deg2rad(22.5))
_TAN_67_5 = np.tan(np.deg2rad(67.5))


def canny_edges(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges of an RGB uint8 image as a uint8 mask (0/255), as OpenCV computes them.

    3x3 Sobel gradients per channel (reflect-101 borders), L1 magnitude, the channel with the
    strongest gradient per pixel, non-maximum suppression in four directions, then hysteresis:
    pixels above `high` start edges, 8-connected pixels above `low` continue them.
    """
    low, high = min(low, high), max(low, high)
    img = hwc3(x).astype(np.int32)
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag_c = np.abs(gx) + np.abs(gy)
    best = mag_c.argmax(axis=2)[..., None]
    mag = np.take_along_axis(mag_c, best, axis=2)[..., 0].astype(np.float64)
    gx = np.take_along_axis(gx, best, axis=2)[..., 0].astype(np.float64)
    gy = np.take_along_axis(gy, best, axis=2)[..., 0].astype(np.float64)

    m = np.pad(mag, 1)
    c = m[1:-1, 1:-1]
    left, right = m[1:-1, :-2], m[1:-1, 2:]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    ul, ur, dl, dr = m[:-2, :-2], m[:-2, 2:], m[2:, :-2], m[2:, 2:]
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < ax * _TAN_22_5
    vertical = ay > ax * _TAN_67_5
    same_sign = (gx * gy) > 0
    keep = np.where(horizontal, (c > left) & (c >= right),
                    np.where(vertical, (c > up) & (c >= down),
                             np.where(same_sign, (c > ul) & (c > dr), (c > ur) & (c > dl))))
    candidate = keep & (mag > low)
    strong = candidate & (mag > high)

    h, w = mag.shape
    edges = np.zeros((h, w), dtype=bool)
    stack = list(zip(*np.nonzero(strong)))
    edges[strong] = True
    while stack:
        y, x0 = stack.pop()
        for dy in (-1, 0, 1):
            yy = y + dy
            if yy < 0 or yy >= h:
                continue
            for dx in (-1, 0, 1):
                xx = x0 + dx
                if 0 <= xx < w and candidate[yy, xx] and not edges[yy, xx]:
                    edges[yy, xx] = True
                    stack.append((yy, xx))
    return (edges * 255).astype(np.uint8)


# -- the preprocessors ----------------------------------------------------------------------------
def _none(img, res, a, b, seed):
    return hwc3(img)


def _invert(img, res, a, b, seed):
    return 255 - hwc3(img)


def _canny(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    return hwc3(remove_pad(canny_edges(padded, a, b)))


def _binary(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    gray = rgb_to_gray(padded)
    t = float(a)
    if t <= 0 or t >= 255:
        t = otsu_threshold(remove_pad(gray[..., None])[..., 0])
    return hwc3(remove_pad(np.where(gray > t, 0, 255).astype(np.uint8)))


def otsu_threshold(gray: np.ndarray) -> float:
    """Otsu's threshold of a uint8 image (the level that best separates two classes)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (mean_total - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between)
    return float(np.argmax(between))


def _threshold(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    return remove_pad(((padded > a) * 255).astype(np.uint8))


def _scribble_xdog(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    f = padded.astype(np.float32)
    dog = (255 - np.min(gaussian_blur(f, 5.0) - gaussian_blur(f, 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    result = np.where(2 * (255 - dog.astype(np.int32)) > a, 255, 0).astype(np.uint8)
    return hwc3(remove_pad(result))


def _blur_gaussian(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    return remove_pad(gaussian_blur(padded, float(a)).clip(0, 255).round().astype(np.uint8))


def _tile_resample(img, res, a, b, seed):
    x = hwc3(img)
    if a < 1.1:
        return x
    h, w = x.shape[:2]
    return resize_array(x, max(1, int(w / a)), max(1, int(h / a)))


def _color_grid(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    h, w = padded.shape[:2]
    small = np.asarray(Image.fromarray(padded).resize((max(1, w // 64), max(1, h // 64)), Image.Resampling.BICUBIC))
    return remove_pad(resize_array(small, w, h, nearest=True))


def _lineart_standard(img, res, a, b, seed):
    padded, remove_pad = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    g = gaussian_blur(x, 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    bright = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(bright)) if bright.size else 16.0)
    intensity *= 127
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    noise = rng.uniform(0, 1, size=(h // f + 2, w // f + 2)).astype(np.float32)
    t = F.interpolate(torch.from_numpy(noise)[None, None], size=(h + 2 * f, w + 2 * f), mode="bicubic", align_corners=False)
    n = t[0, 0, f:f + h, f:f + w].numpy().astype(np.float64)
    n -= n.min()
    n /= max(n.max(), 1e-8)
    return n


def _shuffle(img, res, a, b, seed):
    """Content shuffle: the image warped by a smooth random flow field (seeded by the job's seed)."""
    import torch
    import torch.nn.functional as F
    padded, remove_pad = resize_with_pad(img, res)
    h, w = padded.shape[:2]
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFF)
    fx = _noise_disk(h, w, 256, rng) * (w - 1)
    fy = _noise_disk(h, w, 256, rng) * (h - 1)
    grid = torch.from_numpy(np.stack([fx / (w - 1) * 2 - 1, fy / (h - 1) * 2 - 1], axis=-1)).float()[None]
    src = torch.from_numpy(padded.astype(np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return remove_pad(out[0].permute(1, 2, 0).numpy().clip(0, 255).round().astype(np.uint8))


# name -> run(image, resolution, threshold_a, threshold_b, seed): the entries of the catalog that need no weights.
WEIGHTLESS_RUNNERS: dict[str, Callable] = {
    "none": _none, "invert": _invert, "canny": _canny, "binary": _binary, "threshold": _threshold,
    "scribble_xdog": _scribble_xdog, "blur_gaussian": _blur_gaussian, "tile_resample": _tile_resample,
    "shuffle": _shuffle, "color": _color_grid, "lineart_standard": _lineart_standard, "inpaint": _none,
    "inpaint_only": _none,
}


def runners(pre: Preprocessor) -> tuple[Callable, Callable | None]:
    """(run, run with poses or None) of a catalog entry: `run(image, res, a, b, seed[, env=...])` -> map."""
    if pre.name in WEIGHTLESS_RUNNERS:
        return WEIGHTLESS_RUNNERS[pre.name], None
    from backend.engine.controlnet.annotators import RUNNERS
    return RUNNERS[pre.name]


def run_preprocessor(pre: Preprocessor, image: Image.Image, resolution: int, threshold_a: float, threshold_b: float,
                     *, seed: int = 0, **kwargs) -> Image.Image:
    """Run `pre` on a PIL image; -1 (or None) for a value means the preprocessor's default."""
    res, a, b = pre.arguments(resolution, threshold_a, threshold_b)
    arr = to_array(image)
    run = runners(pre)[0]
    result = run(arr, res, a, b, seed) if pre.model_free else run(arr, res, a, b, seed, **kwargs)
    return Image.fromarray(hwc3(result))


def run_preprocessor_with_poses(pre: Preprocessor, image: Image.Image, resolution: int, threshold_a: float,
                                threshold_b: float, *, seed: int = 0, **kwargs) -> tuple[Image.Image, dict | None]:
    """`run_preprocessor`, plus the OpenPose JSON of a pose preprocessor (None for the others)."""
    with_poses = runners(pre)[1]
    if with_poses is None:
        return run_preprocessor(pre, image, resolution, threshold_a, threshold_b, seed=seed, **kwargs), None
    res, a, b = pre.arguments(resolution, threshold_a, threshold_b)
    result, poses = with_poses(to_array(image), res, a, b, seed, **kwargs)
    return Image.fromarray(hwc3(result)), poses


def run_detect_job(payload: dict, env) -> dict:
    """The backend's half of detect: run the preprocessor; {"maps": PNG bytes per image, "poses": OpenPose JSON
    per image for pose preprocessors, else None}."""
    pre = find_preprocessor(payload["module"])
    maps, poses = [], []
    for img in payload["images"]:
        result, pose = run_preprocessor_with_poses(pre, img, payload.get("processor_res", 512),
                                                   payload.get("threshold_a", -1), payload.get("threshold_b", -1), env=env)
        buf = io.BytesIO()
        result.save(buf, format="PNG")
        maps.append(buf.getvalue())
        poses.append(pose)
    return {"maps": maps, "poses": poses}

