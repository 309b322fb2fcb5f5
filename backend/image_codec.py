"""Decoding images that users send: raw bytes or base64 (optionally a data: URL), with clear errors.

Refuses non-images and decompression bombs before any pixel is decoded in bulk.
"""
from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from .errors import UserError

MAX_IMAGE_PIXELS = 8192 * 8192
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


def open_image_bytes(data: bytes) -> Image.Image:
    """Decode an uploaded image, refusing non-images and decompression bombs with a clear message."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise UserError(f"The image is too large ({img.width}x{img.height}); the limit is {MAX_IMAGE_PIXELS} pixels.",
                            status=413)
        img.load()
    except UserError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserError(f"The image is too large ({exc}); the limit is {MAX_IMAGE_PIXELS} pixels.", status=413) from exc
    except Exception as exc:
        raise UserError(f"The uploaded data is not an image Easel can read ({type(exc).__name__}).") from exc
    return img


def decode_base64_image(data: str, field: str = "image") -> Image.Image:
    """Base64 (optionally a data: URL) -> PIL image, with clear errors for bad input."""
    if not isinstance(data, str) or not data:
        raise UserError(f"{field}: expected a base64-encoded image.")
    raw = _DATA_URL.sub("", data.strip())
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{field}: invalid base64 data ({exc}).") from exc
    try:
        return open_image_bytes(decoded)
    except UserError as exc:
        raise UserError(f"{field}: {exc.message}", status=exc.status) from exc
