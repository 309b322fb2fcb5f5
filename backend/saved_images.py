"""The results' Save and Zip buttons (AUTOMATIC1111's `save_files`): copies of the shown pictures into the
`outdir_save` folder (default `outputs/log/images` in the data folder; A1111's is `log/images`), with a line per picture in its `log.csv`, or one zip
of them, offered for download.

App side, no torch: it gets the pictures the UI shows (PIL) and their infotexts.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import threading
import zipfile
from pathlib import Path

from PIL import Image

from backend.core import infotext as infotext_mod
from backend.core.errors import UserError
from backend.core.images import encode_png, next_sequence_number, sanitize

LOG_FIELDS = ["prompt", "seed", "width", "height", "sampler", "cfgs", "steps", "filename", "negative_prompt",
              "sd_model_name", "sd_model_hash"]  # A1111's log.csv columns
_LOCK = threading.Lock()  # two pages saving at once: one numbering, one csv writer


def save_folder(paths, options) -> Path:
    target = Path(options["outdir_save"])
    folder = target if target.is_absolute() else paths.data_dir / target
    return paths.check_output_folder(folder, "Save")


def chosen(pictures: list, selected: int | None, selected_only: bool) -> list[int]:
    """Which pictures Save takes: the selected one (setting save_selected_only), else all."""
    if selected_only and selected is not None and 0 <= selected < len(pictures):
        return [selected]
    return list(range(len(pictures)))


def _row(params: dict, filename: str, image: Image.Image) -> dict:
    return {"prompt": params.get("Prompt", ""), "seed": params.get("Seed", ""), "width": image.width,
            "height": image.height, "sampler": params.get("Sampler", ""), "cfgs": params.get("CFG scale", ""),
            "steps": params.get("Steps", ""), "filename": filename, "negative_prompt": params.get("Negative prompt", ""),
            "sd_model_name": params.get("Model", ""), "sd_model_hash": params.get("Model hash", "")}


def save_pictures(paths, options, pictures: list[Image.Image], infotexts: list[str], selected: int | None) -> list[Path]:
    """Save the chosen pictures as PNG with their infotext into the save folder, a line each in log.csv."""
    if not pictures:
        raise UserError("There is no picture to save: generate first.")
    folder = save_folder(paths, options)
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    with _LOCK:
        log_file = folder / "log.csv"
        new_log = not log_file.exists()
        with open(log_file, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if new_log:
                writer.writeheader()
            number = next_sequence_number(folder)
            for i in chosen(pictures, selected, bool(options["save_selected_only"])):
                text = infotexts[i] if i < len(infotexts) else ""
                params = infotext_mod.parse_infotext(text) if text else {}
                path = folder / f"{number:05d}-{sanitize(str(params.get('Seed', 'image')))}.png"
                path.write_bytes(encode_png(pictures[i], text or None))
                writer.writerow(_row(params, path.name, pictures[i]))
                saved.append(path)
                number += 1
    return saved


def zip_pictures(paths, options, pictures: list[Image.Image], infotexts: list[str]) -> Path:
    """All the shown pictures (with their infotexts) in one zip in the save folder."""
    if not pictures:
        raise UserError("There is no picture to zip: generate first.")
    folder = save_folder(paths, options)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with _LOCK:
        target = folder / f"images_{stamp}.zip"
        n = 1
        while target.exists():
            target = folder / f"images_{stamp}-{n}.zip"
            n += 1
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for i, picture in enumerate(pictures):
                z.writestr(f"{i:05d}.png", encode_png(picture, infotexts[i] if i < len(infotexts) else None))
        target.write_bytes(buf.getvalue())
    return target
