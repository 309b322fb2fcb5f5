"""Decoding images that users send: raw bytes, base64 (optionally a data: URL) or, where a field takes one, an
http(s) URL fetched by `backend.core.remote_images`, with clear errors;
encoding images as base64 PNG for API answers.

Refuses non-images and decompression bombs before any pixel is decoded in bulk.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image

from backend.core.errors import UserError
from backend.core.paths import IMAGE_EXTENSIONS
from backend.core.remote_images import RemoteImagePolicy, is_url

MAX_IMAGE_PIXELS = 8192 * 8192
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


def open_image_bytes(data: bytes, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode an uploaded image, refusing non-images and decompression bombs with a clear message.

    `formats`: the PIL formats to try (None: every format PIL knows)."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
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


def decode_base64_image(data: str, field: str = "image", remote: RemoteImagePolicy | None = None) -> Image.Image:
    """Base64 (optionally a data: URL) -> PIL image, with clear errors for bad input. `remote`: where the field
    also takes an http(s) URL (A1111's `api_enable_requests`), the policy that fetches it."""
    if not isinstance(data, str) or not data:
        raise UserError(f"{field}: expected a base64-encoded image.")
    if is_url(data):
        if remote is None:
            raise UserError(f"{field}: send the image as base64; URLs are taken only for img2img's init_images "
                            "and mask.")
        fetched = remote.fetch(data, field)
        try:
            return open_image_bytes(fetched)
        except UserError as exc:
            raise UserError(f"{field}: {data.strip()[:200]!r}: {exc.message}", status=exc.status) from exc
    raw = _DATA_URL.sub("", data.strip())
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"{field}: invalid base64 data ({exc}).") from exc
    try:
        return open_image_bytes(decoded)
    except UserError as exc:
        raise UserError(f"{field}: {exc.message}", status=exc.status) from exc



def encode_png_base64(img: Image.Image) -> str:
    """A PIL image as base64 PNG (no data: prefix), the form the A1111 API returns images in."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# The first bytes of each image format a folder batch reads, and the PIL format that decodes it.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_format_of(head: bytes) -> str | None:
    """The PIL format named by a file's first bytes (PNG, JPEG, WebP, BMP, GIF, TIFF), None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


def folder_image_problem(path: Path) -> str | None:
    """Why a file of a batch folder is not read as an image (None: it looks like one), judged before any decoder
    sees it: by its name (an image extension) and by its first bytes (an image format's signature)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file by its name (expected {', '.join(IMAGE_EXTENSIONS)})"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return f"could not be read ({exc.strerror or exc})"
    if image_format_of(head) is None:
        return "its content is not a PNG, JPEG, WebP, BMP, GIF or TIFF image"
    return None


def folder_images(folder: Path, warnings: list[str]) -> list[Path]:
    """The files of a batch folder that look like images (`folder_image_problem`), sorted by name; each other file
    adds a "Skipped NAME: why." to `warnings`."""
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        problem = folder_image_problem(path)
        if problem:
            warnings.append(f"Skipped {path.name}: {problem}.")
        else:
            found.append(path)
    return found


def open_folder_image(path: Path) -> Image.Image:
    """A file of a batch folder as an image: checked by `folder_image_problem`, then decoded only by the format
    its signature names (a file is never handed to every decoder PIL has)."""
    problem = folder_image_problem(path)
    if problem:
        raise UserError(f"{path.name}: {problem}.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path.name} could not be read ({exc.strerror or exc}).") from exc
    try:
        return open_image_bytes(data, formats=(image_format_of(data[:16]),))
    except UserError as exc:
        raise UserError(f"{path.name}: {exc.message}", status=exc.status) from exc
