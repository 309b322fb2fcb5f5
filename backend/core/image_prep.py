"""Preparing user images before anything runs on them, and the names of img2img's mask choices (torch-free).

Both processes use it: the UI flattens uploaded pictures and lists the choices; the img2img pipeline
(`backend.engine.image_ops`) flattens its inputs and writes the chosen names into the infotext.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MASKED_CONTENT = ["fill", "original", "latent noise", "latent nothing"]
INPAINT_AREAS = ["Whole picture", "Only masked"]
MASK_MODES = ["Inpaint masked", "Inpaint not masked"]
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


def flatten(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any mode (RGBA, LA, P, I;16, L) -> RGB, compositing transparency over a background, as A1111 does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")
