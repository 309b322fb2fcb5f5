"""img2img colour correction (A1111's setting `img2img_color_correction`, and Loopback's loops).

A picture made from an init image drifts in colour (loopback's magenta skew). The correction matches each output's
colour histogram to a target's, channel by channel in the 8-bit LAB space (A1111: skimage's `match_histograms` with
`channel_axis=2` on OpenCV's LAB images), then keeps the output's own luminosity and takes only hue and saturation
from the matched picture (A1111's luminosity blend of the matched picture under the output).
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def correction_target(image: Image.Image) -> np.ndarray:
    """What an output is matched to: the target picture in 8-bit LAB (A1111's setup_color_correction)."""
    return cv2.cvtColor(np.asarray(image.convert("RGB"), dtype=np.uint8), cv2.COLOR_RGB2LAB)


def _match_channel(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """`source`'s values moved to the values of `template` at the same quantiles (8-bit values)."""
    src_counts = np.bincount(source.ravel(), minlength=256)
    tmpl_counts = np.bincount(template.ravel(), minlength=256)
    tmpl_values = np.nonzero(tmpl_counts)[0]
    src_quantiles = np.cumsum(src_counts) / source.size
    tmpl_quantiles = np.cumsum(tmpl_counts[tmpl_values]) / template.size
    lookup = np.interp(src_quantiles, tmpl_quantiles, tmpl_values)
    return np.clip(np.rint(lookup), 0, 255).astype(np.uint8)[source]


def match_histograms(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Each channel of the HxWxC uint8 `source` given the histogram of the same channel of `template`."""
    return np.stack([_match_channel(source[..., c], template[..., c]) for c in range(source.shape[-1])], axis=-1)


def _lum(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0:1] * 0.3 + rgb[..., 1:2] * 0.59 + rgb[..., 2:3] * 0.11


def _with_luminosity(colour: np.ndarray, luminosity: np.ndarray) -> np.ndarray:
    """The W3C non-separable "luminosity" blend, SetLum(colour, Lum(luminosity)), on float RGB in 0..1."""
    rgb = colour + (_lum(luminosity) - _lum(colour))
    lum = _lum(rgb)
    low, high = rgb.min(axis=-1, keepdims=True), rgb.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rgb = np.where(low < 0, lum + (rgb - lum) * lum / np.maximum(lum - low, 1e-12), rgb)
        rgb = np.where(high > 1, lum + (rgb - lum) * (1 - lum) / np.maximum(high - lum, 1e-12), rgb)
    return np.clip(rgb, 0, 1)


def apply_color_correction(target: np.ndarray, image: Image.Image) -> Image.Image:
    """`image` with the colours of `target` (from `correction_target`) and its own luminosity."""
    original = np.asarray(image.convert("RGB"), dtype=np.uint8)
    matched = cv2.cvtColor(match_histograms(cv2.cvtColor(original, cv2.COLOR_RGB2LAB), target), cv2.COLOR_LAB2RGB)
    blended = _with_luminosity(matched.astype(np.float32) / 255.0, original.astype(np.float32) / 255.0)
    return Image.fromarray(np.rint(blended * 255.0).astype(np.uint8))
