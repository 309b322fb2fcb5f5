"""ControlNet units as sd-webui-controlnet's API has them: parsing, defaults, control-image sizing, infotext.

A request carries units in `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`, each a
dict with the extension's fields and defaults (`enabled` True, `module` "none", `model` "None",
`weight` 1, `resize_mode` "Crop and Resize", `processor_res`/`threshold_a`/`threshold_b` -1 for
the preprocessor's default, `guidance_start` 0, `guidance_end` 1, `control_mode` "Balanced",
`pixel_perfect` False, `hr_option` "Both"). Enums are accepted by name or by number (0/1/2), as
are the extension's older field names (`input_image`, `lowvram`, `guessmode`) and resize names
("Scale to Fit (Inner Fit)", "Envelope (Outer Fit)").
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from backend.core.errors import UserError
from backend.core.image_codec import decode_base64_image, encode_png_base64

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
_RESIZE_ALIASES = {"scale to fit (inner fit)": "Crop and Resize", "envelope (outer fit)": "Resize and Fill",
                   "just resize": "Just Resize", "crop and resize": "Crop and Resize", "resize and fill": "Resize and Fill",
                   "inner_fit": "Crop and Resize", "outer_fit": "Resize and Fill", "resize": "Just Resize",
                   "resizemode.resize": "Just Resize", "resizemode.inner_fit": "Crop and Resize",
                   "resizemode.outer_fit": "Resize and Fill"}
_CONTROL_ALIASES = {"balanced": CONTROL_MODES[0], "my prompt is more important": CONTROL_MODES[1],
                    "controlnet is more important": CONTROL_MODES[2], "prompt": CONTROL_MODES[1],
                    "control": CONTROL_MODES[2], "controlmode.balanced": CONTROL_MODES[0],
                    "controlmode.prompt": CONTROL_MODES[1], "controlmode.control": CONTROL_MODES[2]}
_HR_ALIASES = {"both": "Both", "low res only": "Low res only", "high res only": "High res only",
               "hirefixoption.both": "Both", "hirefixoption.low_res_only": "Low res only",
               "hirefixoption.high_res_only": "High res only"}


@dataclass
class ControlUnit:
    """One ControlNet unit, its fields named as in sd-webui-controlnet's API."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Image.Image | None = None
    mask: Image.Image | None = None
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    save_detected_map: bool = True

    @property
    def has_model(self) -> bool:
        return bool(self.model) and self.model.strip().lower() not in ("none", "")

    def to_api(self, encode_images: bool = True) -> dict:
        """This unit as the extension's API dict (images as base64 PNG)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("image", "mask")}
        if encode_images:
            out["image"] = encode_png_base64(self.image) if self.image is not None else None
            if self.mask is not None:
                out["mask"] = encode_png_base64(self.mask)
        return out


@dataclass
class UnitJob:
    """A unit as the app process sends it: the parsed unit plus its resolved model file."""

    unit: ControlUnit
    model_path: str | None  # None for units without a model
    model_title: str


def decode_image(data: Any, what: str) -> Image.Image | None:
    """A control image from the API: base64 (or data: URL), a PIL image, an array, or {image, mask}."""
    if data is None or (isinstance(data, str) and not data.strip()):
        return None
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return Image.fromarray(data.astype(np.uint8))
    if isinstance(data, dict):
        return decode_image(data.get("image"), what)
    if not isinstance(data, str):
        raise UserError(f"{what}: expected a base64-encoded image, got {type(data).__name__}.")
    return decode_base64_image(data, what)


def _enum(value: Any, choices: tuple[str, ...], aliases: dict[str, str], what: str) -> str:
    if isinstance(value, bool):
        raise UserError(f"{what}: expected one of {', '.join(choices)} or 0-{len(choices) - 1}, got {value!r}.")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(choices):
        return choices[int(value)]
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit() and int(v) < len(choices):
            return choices[int(v)]
        found = aliases.get(v.lower())
        if found:
            return found
    raise UserError(f"{what}: expected one of {', '.join(repr(c) for c in choices)} or 0-{len(choices) - 1}, got {value!r}.")


def _num(value: Any, kind, what: str):
    if isinstance(value, bool):
        return kind(value)
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what}: expected a number, got {value!r}.") from exc


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_unit(data: Any, index: int = 0) -> ControlUnit:
    """One unit from the API (a dict, or a ControlUnit)."""
    if isinstance(data, ControlUnit):
        return data
    if not isinstance(data, dict):
        raise UserError(f"ControlNet unit {index}: expected an object with the unit's fields, got {type(data).__name__}.")
    what = f"ControlNet unit {index}"
    d = dict(data)
    unit = ControlUnit()
    if "input_image" in d and d.get("image") is None:
        d["image"] = d.pop("input_image")
    if "lowvram" in d and "low_vram" not in d:
        d["low_vram"] = d.pop("lowvram")
    if "enabled" in d and d["enabled"] is not None:
        unit.enabled = _bool(d["enabled"])
    if d.get("module") is not None:
        unit.module = str(d["module"])
    if d.get("model") is not None:
        unit.model = str(d["model"])
    for name, kind in (("weight", float), ("processor_res", int), ("threshold_a", float), ("threshold_b", float),
                       ("guidance_start", float), ("guidance_end", float)):
        if d.get(name) is not None:
            setattr(unit, name, _num(d[name], kind, f"{what}: {name}"))
    for name in ("low_vram", "pixel_perfect", "save_detected_map"):
        if d.get(name) is not None:
            setattr(unit, name, _bool(d[name]))
    if d.get("resize_mode") is not None:
        unit.resize_mode = _enum(d["resize_mode"], RESIZE_MODES, _RESIZE_ALIASES, f"{what}: resize_mode")
    if d.get("control_mode") is not None:
        unit.control_mode = _enum(d["control_mode"], CONTROL_MODES, _CONTROL_ALIASES, f"{what}: control_mode")
    elif _bool(d.get("guessmode") or d.get("guess_mode") or False):
        unit.control_mode = CONTROL_MODES[2]
    if d.get("hr_option") is not None:
        unit.hr_option = _enum(d["hr_option"], HR_OPTIONS, _HR_ALIASES, f"{what}: hr_option")
    image = d.get("image")
    if isinstance(image, dict) and image.get("mask") is not None and d.get("mask") is None:
        d["mask"] = image.get("mask")
    unit.image = decode_image(image, f"{what}: image")
    unit.mask = decode_image(d.get("mask"), f"{what}: mask")
    return unit


def parse_controlnet_args(alwayson_scripts: dict | None) -> list[ControlUnit]:
    """The units in a request's `alwayson_scripts` (key "controlnet", any case), in order."""
    if not alwayson_scripts:
        return []
    entry = None
    for key, value in alwayson_scripts.items():
        if str(key).strip().lower() == "controlnet":
            entry = value
            break
    if entry is None:
        return []
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    if isinstance(args, dict):
        args = [args]
    if not isinstance(args, list):
        raise UserError("alwayson_scripts.controlnet.args must be a list of ControlNet units.")
    return [parse_unit(a, i) for i, a in enumerate(args)]


def check_unit(unit: ControlUnit, index: int) -> list[str]:
    """Errors for values out of range (raised), warnings for units that will not apply (returned)."""
    what = f"ControlNet unit {index}"
    if not 0 <= unit.weight <= 2:
        raise UserError(f"{what}: weight must be between 0 and 2, got {unit.weight}.")
    for name in ("guidance_start", "guidance_end"):
        v = getattr(unit, name)
        if not 0 <= v <= 1:
            raise UserError(f"{what}: {name} must be between 0 and 1, got {v}.")
    if unit.processor_res != -1 and not 64 <= unit.processor_res <= 4096 and unit.processor_res > 0:
        raise UserError(f"{what}: processor_res must be between 64 and 4096 (or -1 for the default), got {unit.processor_res}.")
    warnings = []
    if unit.guidance_start > unit.guidance_end:
        warnings.append(f"{what}: starting control step ({unit.guidance_start}) is after the ending control step "
                        f"({unit.guidance_end}), so it applies in no step; the unit was skipped.")
    return warnings


# -- sizing ---------------------------------------------------------------------------------------
def pixel_perfect_resolution(image_w: int, image_h: int, target_w: int, target_h: int, resize_mode: str) -> int:
    """The preprocessor resolution that makes the map exactly the size it is used at (sd-webui-controlnet)."""
    k0, k1 = target_h / image_h, target_w / image_w
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(round(k * min(image_h, image_w)))


def fit_control_map(image: Image.Image, width: int, height: int, resize_mode: str, *, image_like: bool = False) -> Image.Image:
    """Bring a control map to the generation size as the unit's resize mode says.

    Just Resize: stretched. Crop and Resize: scaled to cover, the middle cut out. Resize and
    Fill: scaled to fit inside, centered, the rest black (or, for picture-like maps, the median
    of the picture's border). Two-valued maps (edges, scribbles) stay two-valued.
    """
    arr = np.asarray(image.convert("RGB"))
    binary = len(np.unique(arr)) <= 2 and not image_like

    def resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
        w, h = max(1, w), max(1, h)
        if (a.shape[1], a.shape[0]) == (w, h):
            return a
        shrink = w * h < a.shape[0] * a.shape[1]
        method = Image.Resampling.BOX if shrink and not binary else Image.Resampling.BICUBIC
        out = np.asarray(Image.fromarray(a).resize((w, h), method))
        if binary:
            hi, lo = int(a.max()), int(a.min())
            out = np.where(out.astype(np.int32) > (hi + lo) // 2, hi, lo).astype(np.uint8)
        return out

    if resize_mode == "Just Resize":
        return Image.fromarray(resize(arr, width, height))
    h0, w0 = arr.shape[:2]
    k = max(height / h0, width / w0) if resize_mode == "Crop and Resize" else min(height / h0, width / w0)
    sw, sh = int(round(w0 * k)), int(round(h0 * k))
    if resize_mode == "Crop and Resize":
        sw, sh = max(sw, width), max(sh, height)
        scaled = resize(arr, sw, sh)
        top, left = (sh - height) // 2, (sw - width) // 2
        return Image.fromarray(np.ascontiguousarray(scaled[top:top + height, left:left + width]))
    sw, sh = min(sw, width), min(sh, height)
    scaled = resize(arr, sw, sh)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if image_like:
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        canvas[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - sh) // 2, (width - sw) // 2
    canvas[top:top + sh, left:left + sw] = scaled
    return Image.fromarray(canvas)


# -- infotext -------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def unit_infotext(unit: ControlUnit, model_title: str, module: str, processor_res: int | None,
                  threshold_a: float | None, threshold_b: float | None) -> str:
    """`Module: canny, Model: ..., Weight: 1, ...` as sd-webui-controlnet writes a unit (values it hides omitted)."""
    items = [("Module", module), ("Model", model_title), ("Weight", unit.weight), ("Resize Mode", unit.resize_mode),
             ("Low Vram", unit.low_vram), ("Processor Res", processor_res), ("Threshold A", threshold_a),
             ("Threshold B", threshold_b), ("Guidance Start", unit.guidance_start), ("Guidance End", unit.guidance_end),
             ("Pixel Perfect", unit.pixel_perfect), ("Control Mode", unit.control_mode), ("Hr Option", unit.hr_option)]
    return ", ".join(f"{k}: {_fmt(v)}" for k, v in items if v is not None and v != -1)


def parse_unit_infotext(text: str) -> dict:
    """`Module: canny, Model: x [h], Weight: 1, ...` -> the API unit dict (enabled, with typed values)."""
    out: dict[str, Any] = {"enabled": True}
    for item in text.split(","):
        if ":" not in item:
            continue
        key, value = item.split(":", 1)
        name = "_".join(w.lower() for w in key.strip().split(" "))
        value = value.strip()
        if value in ("True", "False"):
            parsed: Any = value == "True"
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out[name] = parsed
    return out

