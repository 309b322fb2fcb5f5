"""User settings (the Settings tab, `config.json`, `/sdapi/v1/options`).

One `Options` object, created by the app process from the settings file and passed
to what needs it. Each setting is declared once in `SETTINGS` with its default,
label and validation; keys are AUTOMATIC1111's so API clients work unchanged.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .safe_values import check_value, unsafe_value_problem

IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    section: str
    kind: type = str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    restart_needed: bool = False


SETTINGS: list[Setting] = [
    Setting("sd_model_checkpoint", "", "Stable Diffusion checkpoint", "Stable Diffusion"),
    Setting("sd_vae", "Automatic", "SD VAE", "Stable Diffusion"),
    Setting("sd_checkpoints_limit", 2, "Checkpoints to keep loaded (cached)", "Stable Diffusion", int, minimum=1, maximum=10),
    Setting("CLIP_stop_at_last_layers", 1, "Clip skip", "Stable Diffusion", int, minimum=1, maximum=12),
    Setting("default_sampler", "Euler a", "Default sampler", "Stable Diffusion"),
    Setting("eta_ancestral", 1.0, "Eta for ancestral samplers", "Sampler parameters", float, minimum=0, maximum=1),
    Setting("eta_ddim", 0.0, "Eta for DDIM", "Sampler parameters", float, minimum=0, maximum=1),
    Setting("live_previews_enable", True, "Show live previews of the image being generated", "Live previews", bool),
    Setting("show_progress_every_n_steps", 2, "Live preview every N sampling steps (-1: only at the end of a batch)", "Live previews", int, minimum=-1, maximum=32),
    Setting("samples_save", True, "Always save all generated images", "Saving images", bool),
    Setting("grid_save", True, "Always save all generated image grids", "Saving images", bool),
    Setting("samples_format", "png", "File format for images", "Saving images", str, choices=IMAGE_FORMATS),
    Setting("samples_filename_pattern", "", "Images filename pattern (empty: [number]-[seed])", "Saving images"),
    Setting("save_to_dirs", True, "Save images to a subdirectory per day", "Saving images", bool),
    Setting("directories_filename_pattern", "[date]", "Subdirectory name pattern", "Saving images"),
    Setting("outdir_txt2img_samples", "outputs/txt2img-images", "Output folder for txt2img images", "Paths for saving"),
    Setting("outdir_img2img_samples", "outputs/img2img-images", "Output folder for img2img images", "Paths for saving"),
    Setting("outdir_extras_samples", "outputs/extras-images", "Output folder for images from the Extras tab", "Paths for saving"),
    Setting("outdir_txt2img_grids", "outputs/txt2img-grids", "Output folder for txt2img grids", "Paths for saving"),
    Setting("outdir_img2img_grids", "outputs/img2img-grids", "Output folder for img2img grids", "Paths for saving"),
    Setting("outdir_init_images", "outputs/init-images", "Directory for saving init images when using img2img",
            "Paths for saving"),
    Setting("save_init_img", False, "Save init images when using img2img", "Saving images", bool),
    Setting("enable_pnginfo", True, "Save the generation parameters into the image file", "Saving images", bool),
    Setting("return_grid", True, "Show the grid in the results gallery", "User interface", bool),
    Setting("cpu_bf16", "auto", "bfloat16 on the CPU for the UNet and VAE (auto: where the CPU has bf16 hardware; "
            "--no-half / --precision full keep float32)", "Optimizations", str, choices=("auto", "on", "off")),
    Setting("auto_vae_precision", True, "Automatically revert VAE to 32-bit floats (triggers when a tensor with NaNs "
            "is produced in VAE)", "Optimizations", bool),
    Setting("vae_tiling", "Automatic", "Tiled VAE encode/decode (Automatic: above 2048x2048 or when memory is short)",
            "Optimizations", str, choices=("Automatic", "Always", "Never")),
    Setting("vae_tile_size", 512, "VAE tile size (pixels)", "Optimizations", int, minimum=128, maximum=4096),
    Setting("vae_tile_overlap", 64, "VAE tile overlap (pixels)", "Optimizations", int, minimum=16, maximum=512),
    Setting("face_restoration_model", "CodeFormer", "Face restoration model (Restore faces in txt2img and img2img)",
            "Face restoration", str, choices=("CodeFormer", "GFPGAN")),
    Setting("code_former_weight", 0.5, "CodeFormer weight (0 = maximum effect, 1 = minimum effect)", "Face restoration",
            float, minimum=0, maximum=1),
    Setting("face_detector", "Automatic", "Face detector (Automatic: RetinaFace when its weights are present or can be "
            "downloaded, else the offline OpenCV Haar cascade)", "Face restoration", str,
            choices=("Automatic", "RetinaFace", "OpenCV Haar cascade")),
    Setting("ESRGAN_tile", 192, "Tile size for upscaler models, in pixels (0 = no tiling)", "Upscaling", int,
            minimum=0, maximum=2048),
    Setting("ESRGAN_tile_overlap", 8, "Tile overlap for upscaler models, in pixels (context kept around each tile)",
            "Upscaling", int, minimum=0, maximum=256),
    Setting("control_net_unit_count", 3, "Number of ControlNet units", "ControlNet", int, minimum=1, maximum=10,
            restart_needed=True),
    Setting("control_net_model_cache_size", 2, "ControlNet models to keep loaded (cached)", "ControlNet", int,
            minimum=1, maximum=10),
    Setting("control_net_no_detectmap", False, "Do not append the detected maps to the output", "ControlNet", bool),
    Setting("api_max_request_body_mb", 256, "Largest HTTP request body, in MB (API requests and uploads; larger "
            "ones are refused with 413 before they are read)", "System", int, minimum=1),
    Setting("upload_max_file_size_mb", 256, "Largest file uploaded through the web UI, in MB", "System", int, minimum=1),
    Setting("prompt_max_chunks", 40, "Longest prompt, in chunks of 75 tokens (longer prompts are refused)", "Limits", int,
            minimum=1, maximum=1000),
    Setting("max_images_per_job", 1000, "Most images one job may make (batch size x batch count)", "Limits", int,
            minimum=1, maximum=100000),
    Setting("queue_max_jobs", 200, "Most jobs that may wait in the queue (more are refused: HTTP 503 with Retry-After)",
            "System", int, minimum=1, maximum=100000),
]
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
OUTPUT_DIR_KEYS = tuple(k for k in SETTINGS_BY_KEY if k.startswith("outdir_"))


class Options:
    """Thread-safe settings store backed by a JSON file.

    `validate_dir` checks output folders chosen through the UI or API (it rejects
    folders outside the data dir's outputs/, so the settings API cannot be used to
    write files into code folders).
    """

    def __init__(self, path: Path | None, data_dir: Path, frozen: bool = False):
        self.path = path
        self.data_dir = data_dir
        self.frozen = frozen
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
        self._extra: dict[str, Any] = {}
        self._listeners: list[Callable[[str, Any], None]] = []
        if path is not None and path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"The settings file {path} is not valid JSON ({exc}); fix or delete it.") from exc
            for key, value in stored.items():
                if key in SETTINGS_BY_KEY:
                    try:
                        self._values[key] = self._coerce(SETTINGS_BY_KEY[key], value)
                    except UserError:
                        pass  # a stale value in the file falls back to the default
                else:
                    self._extra[key] = value

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key in self._values:
                return self._values[key]
            return self._extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**self._extra, **self._values}

    def on_change(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    def _coerce(self, setting: Setting, value: Any) -> Any:
        try:
            if setting.kind is bool:
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                else:
                    value = bool(value)
            elif setting.kind is int:
                value = int(value)
            elif setting.kind is float:
                value = float(value)
            else:
                value = "" if value is None else str(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UserError(f"Setting {setting.key!r} must be a {setting.kind.__name__}, got {value!r}.") from exc
        problem = unsafe_value_problem(value, f"Setting {setting.key!r}")
        if problem:
            raise UserError(problem)
        if setting.choices is not None and value not in setting.choices:
            raise UserError(f"Setting {setting.key!r} must be one of {', '.join(map(str, setting.choices))}, got {value!r}.")
        if setting.minimum is not None and value < setting.minimum:
            raise UserError(f"Setting {setting.key!r} must be at least {setting.minimum}, got {value!r}.")
        if setting.maximum is not None and value > setting.maximum:
            raise UserError(f"Setting {setting.key!r} must be at most {setting.maximum}, got {value!r}.")
        if setting.key in OUTPUT_DIR_KEYS:
            self.validate_dir(setting.key, value)
        return value

    def validate_dir(self, key: str, value: str) -> None:
        root = (self.data_dir / "outputs").resolve()
        target = Path(value)
        if not target.is_absolute():
            target = self.data_dir / target
        target = target.resolve()
        if target != root and root not in target.parents:
            raise UserError(f"Setting {key!r}: output folders must lie inside {root}.", status=403)

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate and apply several settings at once; unknown keys are kept verbatim (as A1111 does)."""
        if self.frozen and changes:
            raise UserError("Settings are frozen (--freeze-settings).", status=403)
        coerced = {}
        for key, value in changes.items():
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None:
                check_value({key: value}, status=400)  # kept verbatim: it must still be writable as JSON
            coerced[key] = self._coerce(setting, value) if setting else value
        with self._lock:
            for key, value in coerced.items():
                if key in SETTINGS_BY_KEY:
                    self._values[key] = value
                else:
                    self._extra[key] = value
        self.save()
        for key, value in coerced.items():
            for listener in self._listeners:
                listener(key, value)
        return coerced

    def save(self) -> None:
        if self.path is None:
            return
        data = self.as_dict()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.path)

    def output_dir(self, key: str) -> Path:
        target = Path(self[key])
        return target if target.is_absolute() else self.data_dir / target
