"""AUTOMATIC1111's `modules.images.save_image`: saves through Easel's image saving (numbered files, the infotext
in the PNG) into a folder of the running job's outputs."""
from __future__ import annotations

from pathlib import Path

from modules.context import current, missing

__all__ = ["save_image"]


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    """-> (the file's path, the text file's path beside it when the setting `save_txt` wrote one, else None)."""
    context = current("modules.images.save_image")
    if context.save_image is None:
        raise RuntimeError("modules.images.save_image can only be called while a job runs the script.")
    saved = context.save_image(image, path, basename=basename or "", seed=seed, extension=extension, info=info,
                               forced_filename=forced_filename, suffix=suffix)
    txt = Path(saved).with_suffix(".txt")
    return str(saved), (str(txt) if info and txt.is_file() else None)


def __getattr__(name: str):
    raise missing(__name__, name)
