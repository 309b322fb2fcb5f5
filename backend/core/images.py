"""Saving images the way AUTOMATIC1111 does: folders per day, `NNNNN-SEED.png`
names (or a filename pattern), the infotext in the PNG `parameters` chunk (EXIF
UserComment for JPEG/WebP), and grids for batches.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import math
import os
import re
import secrets
import threading
from pathlib import Path
from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping

from PIL import Image, PngImagePlugin

log = logging.getLogger("easel.images")

_SAVE_LOCK = threading.RLock()  # reentrant: an extension's before_save may save a picture itself
TEMP_PREFIX = ".easel-partial-"  # files being written (see write_atomically); never a sequence number
_BAD_CHARS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
_TOKEN = re.compile(r"\[(\w+)(?:<([^>]*)>)?\]")
MAX_NAME = 128


def sanitize(text: str) -> str:
    text = _BAD_CHARS.sub("_", text).strip(" .")
    return text[:MAX_NAME]


class FilenameGenerator:
    """Expands A1111 filename-pattern tokens such as [seed], [prompt_words], [date], [model_name]."""

    def __init__(self, values: dict[str, object]):
        self.values = values

    def apply(self, pattern: str) -> str:
        def replace(m: re.Match) -> str:
            key, arg = m.group(1).lower(), m.group(2)
            now = _dt.datetime.now()
            if key == "date":
                return now.strftime("%Y-%m-%d")
            if key == "datetime":
                return now.strftime(arg or "%Y%m%d%H%M%S")
            if key == "prompt_words":
                words = re.findall(r"[\w]+", str(self.values.get("prompt", "")))[:8]
                return " ".join(words) or "empty"
            if key in ("prompt", "prompt_no_styles"):  # the prompt with / without the job's styles
                return str(self.values.get(key, self.values.get("prompt", "")))[:MAX_NAME]
            value = self.values.get(key)
            return m.group(0) if value is None else str(value)

        return sanitize(_TOKEN.sub(replace, pattern))


def next_sequence_number(folder: Path) -> int:
    """1 + the highest leading number of the files in `folder` (A1111's `get_next_sequence_number`)."""
    result = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            m = re.match(r"(\d+)", name)
            if m:
                result = max(result, int(m.group(1)))
    return result + 1


def encode_png(image: Image.Image, infotext: str | None) -> bytes:
    buf = io.BytesIO()
    pnginfo = None
    if infotext:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("parameters", infotext)
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageFormat:
    """How a picture is written: the file format (A1111's `samples_format` / `grid_format`: png, jpg, webp), the
    quality of jpg and lossy webp (`jpeg_quality`) and lossless webp (`webp_lossless`)."""

    ext: str = "png"
    quality: int = 80
    lossless: bool = False

    @classmethod
    def of(cls, options: Mapping, key: str = "samples_format") -> ImageFormat:
        """The format a job's settings choose for its pictures (`key`: samples_format, or grid_format for grids)."""
        return cls(normalized_ext(str(options[key])), int(options["jpeg_quality"]), bool(options["webp_lossless"]))


def normalized_ext(fmt: str) -> str:
    """A format name as files are named: lower case, jpeg as jpg."""
    fmt = fmt.lower().lstrip(".")
    return "jpg" if fmt == "jpeg" else fmt


def encode_image(image: Image.Image, infotext: str | None, fmt: ImageFormat | str = "png",
                 extra_text: dict[str, str] | None = None) -> bytes:
    """`image` as the bytes of a file in `fmt`, with `infotext` as A1111 stores it: the PNG text chunk `parameters`
    (and `extra_text`'s chunks), or the EXIF UserComment of a jpg/webp file."""
    buf = io.BytesIO()
    _write_image(buf, image, infotext, fmt if isinstance(fmt, ImageFormat) else ImageFormat(normalized_ext(fmt)),
                 extra_text)
    return buf.getvalue()


def reencode_png(png: bytes, infotext: str | None, fmt: ImageFormat) -> bytes:
    """A job's PNG bytes in `fmt` (the API's base64 images follow `samples_format`, as A1111's): unchanged for png,
    else decoded and written as jpg/webp with `infotext` (None: the PNG's own `parameters`) in the EXIF
    UserComment."""
    if fmt.ext == "png" or not png:
        return png
    with Image.open(io.BytesIO(png)) as picture:
        picture.load()
        text = infotext if infotext is not None else picture.info.get("parameters")
        return encode_image(picture, text if isinstance(text, str) else None, fmt)


def _write_image(f: BinaryIO, image: Image.Image, infotext: str | None, fmt: ImageFormat,
                 extra_text: dict[str, str] | None = None) -> None:
    if fmt.ext == "png":
        pnginfo = None
        for key, value in {**({"parameters": infotext} if infotext else {}), **(extra_text or {})}.items():
            pnginfo = pnginfo or PngImagePlugin.PngInfo()
            pnginfo.add_text(key, value)
        image.save(f, format="PNG", pnginfo=pnginfo)
        return
    if fmt.ext not in ("jpg", "webp"):
        raise ValueError(f"unknown image format {fmt.ext!r} (png, jpg, webp)")
    kwargs: dict = {"quality": fmt.quality}
    if infotext:
        kwargs["exif"] = _exif_user_comment(infotext)
    if fmt.ext == "jpg":
        img = image if image.mode in ("RGB", "L") else image.convert("RGB")
        img.save(f, format="JPEG", **kwargs)
    else:
        img = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA" if "A" in image.mode else "RGB")
        img.save(f, format="WEBP", lossless=fmt.lossless, **kwargs)


def _exif_user_comment(infotext: str) -> bytes:
    """EXIF with `infotext` as the UserComment of the Exif sub-IFD, written as A1111 writes it (piexif: type
    UNDEFINED, "UNICODE\\0" then UTF-16), so that A1111's reader and other tools read it back."""
    import piexif
    import piexif.helper

    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def save_image(image: Image.Image, folder: Path, *, seed: int | None, infotext: str | None,
               fmt: ImageFormat | str = "png", pattern: str = "", name_values: dict | None = None, basename: str = "",
               with_pnginfo: bool = True, forced_name: str = "", extra_text: dict[str, str] | None = None,
               save_txt: bool = False, before_save: Callable | None = None,
               after_save: Callable | None = None) -> Path:
    """Write `image` into `folder` as `NNNNN-SEED.ext` (or the pattern), never overwriting a file.

    `forced_name`: save as `NAME.ext` instead (`NAME-1.ext`, ... when taken), as A1111 keeps the original names of
    a batch from a directory. `extra_text`: more PNG text chunks beside `parameters` (e.g. A1111's `extras`).
    `before_save(image, path, texts) -> (image, texts)` / `after_save(image, path, texts)`: called with the file's
    path once it is chosen / once it is written (the extensions' on_before_image_saved / on_image_saved); `texts`
    is {"parameters": infotext, **extra_text}, and what `before_save` returns is what is written.
    `fmt`: png, jpg or webp (an `ImageFormat` with quality and lossless webp, from the job's settings).
    `save_txt` (A1111's setting): the infotext also into `NAME.txt` beside the picture.
    """
    folder.mkdir(parents=True, exist_ok=True)
    image_format = fmt if isinstance(fmt, ImageFormat) else ImageFormat(normalized_ext(fmt))
    fmt = image_format.ext
    values = dict(name_values or {})
    values.setdefault("seed", seed)
    decoration = FilenameGenerator(values).apply(pattern) if pattern else (str(seed) if seed is not None else "")
    if basename:
        decoration = f"{basename}-{decoration}" if decoration else basename
    with _SAVE_LOCK:
        number = 0 if forced_name else next_sequence_number(folder)
        while True:
            if forced_name:
                stem = sanitize(forced_name) + (f"-{number}" if number else "")
            else:
                stem = f"{number:05}-{decoration}" if decoration else f"{number:05}"
            path = folder / f"{stem}.{fmt}"
            if not path.exists():
                break
            number += 1
        if before_save is not None or after_save is not None:
            texts = {**({"parameters": infotext} if infotext else {}), **(extra_text or {})}
            if before_save is not None:
                image, texts = before_save(image, path, texts)
            infotext = texts.get("parameters")
            extra_text = {k: str(v) for k, v in texts.items() if k != "parameters" and v is not None}
        text = infotext if with_pnginfo else None
        chunks = extra_text if with_pnginfo and fmt == "png" else None
        write_atomically(path, lambda f: _write_image(f, image, text, image_format, chunks))
        if save_txt and infotext:
            txt = path.with_suffix(".txt")
            write_atomically(txt, lambda f: f.write((infotext + "\n").encode("utf-8")))
    if after_save is not None:
        after_save(image, path, {**({"parameters": infotext} if infotext else {}), **(extra_text or {})})
    return path


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(file)` into a hidden temporary name beside `path`, then rename it into place.

    A failure (full disk, an encoder error, a crash) never leaves a partial file under `path`; the temporary file
    is removed when the failure is an exception. Its name starts with a dot, so it never counts as a sequence number.
    """
    while True:
        tmp = path.parent / f"{TEMP_PREFIX}{path.stem[:40]}-{secrets.token_hex(4)}.tmp"
        try:  # mode 0o666 less the umask, as a file written in place would get
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_failure_message(what: str, folder: Path, exc: Exception) -> str:
    """The warning shown when an image could not be written (the job still returns it)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (f"Could not save the {what} into {folder}: {reason}. The image is shown here but not saved; "
            f"check the output folder settings and free disk space.")


def save_image_or_warn(warnings: list[str], what: str, image: Image.Image, folder: Path, **kwargs) -> Path | None:
    """`save_image`, turning a failure to write (OSError: no permission, a file where the folder should be,
    disk full) into a warning in `warnings` (once per message) instead of failing the job; None when not saved."""
    try:
        return save_image(image, folder, **kwargs)
    except (OSError, ValueError) as exc:
        message = save_failure_message(what, folder, exc)
        log.error("%s", message)
        if message not in warnings:
            warnings.append(message)
        return None


def image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Lay images out in a near-square grid (A1111's default: rows = round(sqrt(n)))."""
    n = len(images)
    if rows is None or rows <= 0:
        rows = max(1, round(math.sqrt(n)))
    rows = min(rows, n)
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, img in enumerate(images):
        grid.paste(img, box=((i % cols) * w, (i // cols) * h))
    return grid


def day_folder(root: Path, save_to_dirs: bool = True) -> Path:
    return root / _dt.date.today().strftime("%Y-%m-%d") if save_to_dirs else root
