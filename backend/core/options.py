"""User settings (the Settings tab, `config.json`, `/sdapi/v1/options`).

One `Options` object, created by the app process from the settings file and passed
to what needs it. Each setting is declared once in `SETTINGS` with its default,
label and validation; keys are AUTOMATIC1111's so API clients work unchanged.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backend.core.errors import UserError
from backend.core.extensions import DISABLE_ALL_CHOICES
from backend.core.safe_values import check_value, unsafe_value_problem

log = logging.getLogger("easel.options")

IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp")
RANDN_SOURCES = ("GPU", "CPU", "NV")  # where the noise comes from (backend.engine.rng)
# A1111's emphasis modes (setting `emphasis`, its modules/sd_emphasis.py): "None" reads brackets and weights as plain
# text, "Ignore" parses them but applies no weight, "Original" multiplies the text encoder's hidden states by the
# weights and restores their mean, "No norm" multiplies without restoring the mean.
EMPHASIS_MODES = ("None", "Ignore", "Original", "No norm")
# A1111's live preview methods (setting `show_progress_type`).
PREVIEW_METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")


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
    Setting("sd_vae_overrides_per_model_preferences", True, "Selected VAE overrides per-model preferences (a "
            "checkpoint's VAE set in its user metadata, NAME.json, or a NAME.vae.* file beside it)", "Stable Diffusion",
            bool),
    # A1111's VAE types (backend.engine.pipelines.common: decode_latents, encode_images): TAESD's tiny networks
    # (SD 1.x/2.x and SDXL; downloaded on first use into models/VAE-taesd) in place of the checkpoint's VAE.
    Setting("sd_vae_encode_method", "Full", "VAE type for encode (method to encode image to latent: img2img, "
            "hires. fix; TAESD: faster, rougher; SD 1.x/2.x and SDXL)", "Stable Diffusion", str,
            choices=("Full", "TAESD")),
    Setting("sd_vae_decode_method", "Full", "VAE type for decode (method to decode latent to image; TAESD: faster, "
            "rougher; SD 1.x/2.x and SDXL)", "Stable Diffusion", str, choices=("Full", "TAESD")),
    # Forge's "VAE / Text Encoder" beside the checkpoint: the files that complete a FLUX.1 / SD3 checkpoint (a VAE,
    # CLIP-L, CLIP-G, T5-XXL from models/VAE, models/text_encoder, models/clip), kept as Forge keeps them: full paths
    Setting("forge_additional_modules", [], "VAE / Text Encoder: the parts that complete a FLUX.1 or SD3 checkpoint "
            "(files in models/VAE, models/text_encoder, models/clip)", "Stable Diffusion", list),
    Setting("sd_checkpoints_limit", 2, "Checkpoints to keep loaded (cached)", "Stable Diffusion", int, minimum=1, maximum=10),
    Setting("tiling", False, "Tiling: produce a tileable picture (for API requests that leave tiling unset)",
            "Stable Diffusion", bool),
    Setting("CLIP_stop_at_last_layers", 1, "Clip skip", "Stable Diffusion", int, minimum=1, maximum=12),
    Setting("emphasis", "Original", "Emphasis mode: how (more:1.1) and [less] in prompts act (None: read as text; "
            "Ignore: no weight; Original: weighted, the mean restored; No norm: weighted, the mean not restored)",
            "Stable Diffusion", str, choices=EMPHASIS_MODES),
    Setting("default_sampler", "Euler a", "Default sampler", "Stable Diffusion"),
    Setting("eta_ancestral", 1.0, "Eta for ancestral samplers", "Sampler parameters", float, minimum=0, maximum=1),
    Setting("eta_ddim", 0.0, "Eta for DDIM", "Sampler parameters", float, minimum=0, maximum=1),
    # The noise of sampling (backend.engine.rng; written into the infotext as "ENSD", "RNG", "Sigma churn", ...)
    Setting("eta_noise_seed_delta", 0, "Eta noise seed delta (ENSD): the ancestral samplers' noise uses seed + this",
            "Sampler parameters", int, minimum=0),
    Setting("randn_source", "GPU", "Random number generator source (GPU: the device's; CPU: the same pictures on "
            "every machine; NV: NVIDIA's generator emulated, the same pictures as an NVIDIA card)",
            "Sampler parameters", str, choices=RANDN_SOURCES),
    Setting("s_churn", 0.0, "sigma churn (Euler, Heun, DPM2)", "Sampler parameters", float, minimum=0, maximum=100),
    Setting("s_tmin", 0.0, "sigma tmin (Euler, Heun, DPM2)", "Sampler parameters", float, minimum=0, maximum=10),
    Setting("s_tmax", 0.0, "sigma tmax (0 = inf; Euler, Heun, DPM2)", "Sampler parameters", float, minimum=0,
            maximum=999),
    Setting("s_noise", 1.0, "sigma noise (the amount of noise the stochastic samplers add)", "Sampler parameters",
            float, minimum=0, maximum=1.1),
    Setting("s_min_uncond", 0.0, "Negative Guidance minimum sigma (skip the negative prompt on every other step "
            "below this noise level; 0: never)", "Sampler parameters", float, minimum=0, maximum=15),
    Setting("s_min_uncond_all", False, "Negative Guidance minimum sigma: skip on all steps below it, not every other",
            "Sampler parameters", bool),
    Setting("skip_early_cond", 0.0, "Ignore negative prompt during early sampling (fraction of the steps; 0: never)",
            "Sampler parameters", float, minimum=0, maximum=1),
    # SD 3.5's skip-layer guidance ("SLG", SAI's recipe for SD 3.5 Medium), for SD3 models only
    Setting("sd3_slg_scale", 0.0, "SD3 skip-layer guidance scale (the picture pushed away from the prediction made "
            "without the layers below; SAI suggests 2.5-3 for SD 3.5 Medium; 0: off)", "Sampler parameters", float,
            minimum=0, maximum=10),
    Setting("sd3_slg_layers", "7, 8, 9", "SD3 skip-layer guidance: the transformer blocks skipped (numbers from 0, "
            "comma-separated)", "Sampler parameters"),
    Setting("sd3_slg_start", 0.01, "SD3 skip-layer guidance: from this fraction of the steps", "Sampler parameters",
            float, minimum=0, maximum=1),
    Setting("sd3_slg_end", 0.2, "SD3 skip-layer guidance: until this fraction of the steps", "Sampler parameters",
            float, minimum=0, maximum=1),
    Setting("live_previews_enable", True, "Show live previews of the image being generated", "Live previews", bool),
    Setting("show_progress_every_n_steps", 2, "Live preview every N sampling steps (-1: only at the end of a batch)", "Live previews", int, minimum=-1, maximum=32),
    Setting("show_progress_type", "Approx NN", "Live preview method (Full: the VAE; Approx NN, TAESD: small networks "
            "downloaded on first use; Approx cheap: no file)", "Live previews", str, choices=PREVIEW_METHODS),
    Setting("samples_save", True, "Always save all generated images", "Saving images", bool),
    Setting("grid_save", True, "Always save all generated image grids", "Saving images", bool),
    Setting("samples_format", "png", "File format for images", "Saving images", str, choices=IMAGE_FORMATS),
    Setting("grid_format", "png", "File format for grids", "Saving images", str, choices=IMAGE_FORMATS),
    Setting("jpeg_quality", 80, "Quality for saved jpeg and webp images", "Saving images", int, minimum=1, maximum=100),
    Setting("webp_lossless", False, "Use lossless compression for webp images", "Saving images", bool),
    Setting("save_txt", False, "Create a text file next to every image with generation parameters", "Saving images",
            bool),
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
    # A1111's default is log/images; Easel keeps every output folder inside outputs/ (the settings gate's rule)
    Setting("outdir_save", "outputs/log/images", "Directory for saving images using the Save button",
            "Paths for saving"),
    Setting("save_selected_only", True, "When using the Save button, only save the selected image", "Saving images",
            bool),
    Setting("save_init_img", False, "Save init images when using img2img", "Saving images", bool),
    Setting("img2img_fix_steps", False, "With img2img, do exactly the amount of steps the slider specifies "
            "(normally you'd do less with less denoising)", "img2img", bool),
    Setting("initial_noise_multiplier", 1.0, "Noise multiplier for img2img", "img2img", float, minimum=0, maximum=1.5),
    Setting("img2img_color_correction", False, "Apply color correction to img2img results to match original colors.",
            "img2img", bool),
    Setting("hires_fix_refiner_pass", "second pass", "Hires fix: which pass to enable refiner for", "Stable Diffusion",
            str, choices=("first pass", "second pass", "both passes")),
    Setting("sdxl_refiner_low_aesthetic_score", 2.5, "SDXL low aesthetic score (the negative prompt's, for the SDXL "
            "refiner)", "Stable Diffusion XL", float, minimum=0, maximum=10),
    Setting("sdxl_refiner_high_aesthetic_score", 6.0, "SDXL high aesthetic score (the prompt's, for the SDXL "
            "refiner)", "Stable Diffusion XL", float, minimum=0, maximum=10),
    Setting("enable_pnginfo", True, "Save the generation parameters into the image file", "Saving images", bool),
    Setting("add_model_hash_to_info", True, "Add model hash to generation information", "Infotext", bool),
    Setting("add_model_name_to_info", True, "Add model name to generation information", "Infotext", bool),
    Setting("add_version_to_infotext", True, "Add program version to generation information", "Infotext", bool),
    Setting("keyedit_precision_attention", 0.1, "Ctrl+Up/Down precision when editing (attention:1.1)",
            "User interface", float, minimum=0.01, maximum=0.2),
    Setting("keyedit_precision_extra", 0.05, "Ctrl+Up/Down precision when editing <extra networks:0.9>",
            "User interface", float, minimum=0.01, maximum=0.2),
    Setting("keyedit_delimiters", ".,\\/!?%^*;:{}=`~() ", "Word delimiters when editing the prompt with Ctrl+Up/Down",
            "User interface"),
    Setting("infotext_styles", "Apply if any", "Infotext: handling of styles when pasting (PNG Info, Send to, the "
            "paste button)", "User interface", choices=("Ignore", "Apply", "Discard", "Apply if any")),
    Setting("return_grid", True, "Show the grid in the results gallery", "User interface", bool),
    # A1111's default is ["sd_model_checkpoint"]; Easel has always shown the VAE beside it
    Setting("quicksettings_list", ["sd_model_checkpoint", "sd_vae"], "Quicksettings list (settings shown at the top "
            "of the page as well; takes effect at the next page load: Reload UI)", "User interface", list),
    Setting("cpu_bf16", "auto", "bfloat16 on the CPU for the UNet and VAE (auto: where the CPU has bf16 hardware; "
            "--no-half / --precision full keep float32)", "Optimizations", str, choices=("auto", "on", "off")),
    Setting("auto_vae_precision", True, "Automatically revert VAE to 32-bit floats (triggers when a tensor with NaNs "
            "is produced in VAE)", "Optimizations", bool),
    Setting("token_merging_ratio", 0.0, "Token merging ratio (0 = off; merges similar tokens in the UNet's "
            "self-attention at the highest resolution: faster, a little different)", "Optimizations", float,
            minimum=0, maximum=0.9),
    Setting("token_merging_ratio_img2img", 0.0, "Token merging ratio for img2img (used when not 0, in place of the "
            "ratio above)", "Optimizations", float, minimum=0, maximum=0.9),
    Setting("token_merging_ratio_hr", 0.0, "Token merging ratio for the hires. fix pass (used when not 0, in place "
            "of the ratio above)", "Optimizations", float, minimum=0, maximum=0.9),
    Setting("vae_tiling", "Automatic", "Tiled VAE encode/decode (Automatic: above 2048x2048 or when memory is short)",
            "Optimizations", str, choices=("Automatic", "Always", "Never")),
    Setting("vae_tile_size", 512, "VAE tile size (pixels)", "Optimizations", int, minimum=128, maximum=4096),
    Setting("vae_tile_overlap", 64, "VAE tile overlap (pixels)", "Optimizations", int, minimum=16, maximum=512),
    Setting("face_restoration", False, "Restore faces (for API requests that leave restore_faces unset)",
            "Face restoration", bool),
    Setting("face_restoration_model", "CodeFormer", "Face restoration model (Restore faces in txt2img and img2img)",
            "Face restoration", str, choices=("CodeFormer", "GFPGAN")),
    Setting("code_former_weight", 0.5, "CodeFormer weight (0 = maximum effect, 1 = minimum effect)", "Face restoration",
            float, minimum=0, maximum=1),
    Setting("face_detector", "Automatic", "Face detector (Automatic: RetinaFace when its weights are present or can be "
            "downloaded, else the offline OpenCV Haar cascade)", "Face restoration", str,
            choices=("Automatic", "RetinaFace", "OpenCV Haar cascade")),
    # A1111's default is null (JSON): a Lanczos resize, as "None"
    Setting("upscaler_for_img2img", "None", "Upscaler for img2img (enlarges an init image smaller than the output "
            "size before it is resized; None: Lanczos)", "Upscaling"),
    Setting("ESRGAN_tile", 192, "Tile size for upscaler models, in pixels (0 = no tiling)", "Upscaling", int,
            minimum=0, maximum=2048),
    Setting("ESRGAN_tile_overlap", 8, "Tile overlap for upscaler models, in pixels (context kept around each tile)",
            "Upscaling", int, minimum=0, maximum=256),
    Setting("interrogate_keep_models_in_memory", False, "Interrogate: keep models in VRAM", "Interrogate", bool),
    Setting("interrogate_return_ranks", False, "Interrogate: include ranks of model tags matches in results.",
            "Interrogate", bool),
    Setting("interrogate_clip_num_beams", 1, "BLIP: num_beams", "Interrogate", int, minimum=1, maximum=16),
    Setting("interrogate_clip_min_length", 24, "BLIP: minimum description length", "Interrogate", int, minimum=1,
            maximum=128),
    Setting("interrogate_clip_max_length", 48, "BLIP: maximum description length", "Interrogate", int, minimum=1,
            maximum=256),
    Setting("interrogate_clip_dict_limit", 1500, "CLIP: maximum number of lines in text file (0 = No limit)",
            "Interrogate", int, minimum=0),
    Setting("interrogate_clip_skip_categories", [], "CLIP: skip inquire categories (names of the files in "
            "models/interrogate)", "Interrogate", list),
    Setting("interrogate_deepbooru_score_threshold", 0.5, "deepbooru: score threshold", "Interrogate", float,
            minimum=0, maximum=1),
    Setting("deepbooru_sort_alpha", True, "deepbooru: sort tags alphabetically", "Interrogate", bool),
    Setting("deepbooru_use_spaces", True, "deepbooru: use spaces in tags", "Interrogate", bool),
    Setting("deepbooru_escape", True, "deepbooru: escape (\\) brackets", "Interrogate", bool),
    Setting("deepbooru_filter_tags", "", "deepbooru: filter out those tags (comma-separated)", "Interrogate"),
    Setting("control_net_unit_count", 3, "Number of ControlNet units", "ControlNet", int, minimum=1, maximum=10,
            restart_needed=True),
    Setting("control_net_model_cache_size", 2, "ControlNet models to keep loaded (cached)", "ControlNet", int,
            minimum=1, maximum=10),
    Setting("control_net_no_detectmap", False, "Do not append the detected maps to the output", "ControlNet", bool),
    Setting("api_max_request_body_mb", 256, "Largest HTTP request body, in MB (API requests and uploads; larger "
            "ones are refused with 413 before they are read)", "System", int, minimum=1),
    Setting("api_enable_requests", True, "Allow http:// and https:// URLs for input images in the API (init_images, "
            "mask)", "System", bool),
    Setting("api_forbid_local_requests", True, "Forbid URLs to local resources (loopback, private, link-local and "
            "reserved addresses, after each redirect too)", "System", bool),
    Setting("extra_networks_default_multiplier", 1.0, "Default weight a LoRA card adds (<lora:name:weight>)", "Extra Networks",
            float, minimum=0, maximum=2),
    Setting("extra_networks_card_width", 0, "Card width for Extra Networks, px (0: 160)", "Extra Networks", int, minimum=0,
            maximum=1024),
    Setting("extra_networks_card_height", 0, "Card height for Extra Networks, px (0: 200)", "Extra Networks", int, minimum=0,
            maximum=1024),
    Setting("upload_max_file_size_mb", 256, "Largest file uploaded through the web UI, in MB", "System", int, minimum=1),
    Setting("prompt_max_chunks", 40, "Longest prompt, in chunks of 75 tokens (longer prompts are refused)", "Limits", int,
            minimum=1, maximum=1000),
    Setting("max_images_per_job", 1000, "Most images one job may make (batch size x batch count)", "Limits", int,
            minimum=1, maximum=100000),
    Setting("queue_max_jobs", 200, "Most jobs that may wait in the queue (more are refused: HTTP 503 with Retry-After)",
            "System", int, minimum=1, maximum=100000),
    # the Extensions tab's enabled checkboxes (not a field of the Settings tab), as A1111 keeps them in config.json
    Setting("disabled_extensions", [], "Disabled extensions", "Extensions", list, restart_needed=True),
    # the Extensions tab's "Disable all extensions" radio (A1111's): none, extra (only built-in ones run), all
    Setting("disable_all_extensions", "none", "Disable all extensions (preserves the list of disabled extensions)",
            "Extensions", str, choices=DISABLE_ALL_CHOICES, restart_needed=True),
]
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
OUTPUT_DIR_KEYS = tuple(k for k in SETTINGS_BY_KEY if k.startswith("outdir_"))
# Settings whose text becomes part of a saved file's path below an output folder.
NAME_PATTERN_KEYS = ("samples_filename_pattern", "directories_filename_pattern")
# What one job may still override under --freeze-settings: the generation parameters A1111 writes into the
# infotext (Model hash, VAE, Clip skip, Eta, Eta DDIM, Noise multiplier). The UI sends the first three with every
# job, and a pasted infotext carries them; they change that job only, never config.json.
PER_JOB_WHEN_FROZEN = ("sd_model_checkpoint", "sd_vae", "forge_additional_modules", "CLIP_stop_at_last_layers", "eta_ancestral", "eta_ddim",
                       "initial_noise_multiplier", "eta_noise_seed_delta", "randn_source", "s_churn", "s_tmin",
                       "s_tmax", "s_noise")
MAX_TEXT_LENGTH = 4096
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")  # C:\ or C: (a Windows absolute path)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def coerce(setting: Setting, value: Any) -> Any:
    """`value` as `setting` holds it, or a UserError (400) naming the setting.

    Accepts what the UI, JSON clients and pasted infotext send: numbers as numbers or numeric text, whole floats for
    integers, booleans as true/false or 0/1 or their text. Refuses other JSON types, NaN and Infinity, values
    outside the choices or range, control characters, and name patterns that would leave their folder.
    """
    key = setting.key
    if setting.kind is bool:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int) and value in (0, 1):
            value = bool(value)
        elif isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            value = value.strip().lower() in _TRUE
        else:
            raise UserError(f"Setting {key!r} must be true or false, got {_shown(value)}.")
    elif setting.kind in (int, float):
        value = _number(setting, value)
    elif setting.kind is list:
        value = _file_names(setting, value) if key in FILE_LIST_KEYS else _names(setting, value)
    else:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise UserError(f"Setting {key!r} must be a string, got {_shown(value)}.")
        if len(value) > MAX_TEXT_LENGTH:
            raise UserError(f"Setting {key!r} is too long ({len(value)} characters, at most {MAX_TEXT_LENGTH}).")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise UserError(f"Setting {key!r} must not contain control characters, got {_shown(value)}.")
    if setting.choices is not None and value not in setting.choices:
        raise UserError(f"Setting {key!r} must be one of {', '.join(map(str, setting.choices))}, got {_shown(value)}.")
    if setting.minimum is not None and value < setting.minimum:
        raise UserError(f"Setting {key!r} must be at least {setting.minimum}, got {_shown(value)}.")
    if setting.maximum is not None and value > setting.maximum:
        raise UserError(f"Setting {key!r} must be at most {setting.maximum}, got {_shown(value)}.")
    if key in NAME_PATTERN_KEYS:
        parts = value.replace("\\", "/").split("/")
        if value.startswith(("/", "\\")) or _DRIVE.match(value) or ".." in (p.strip() for p in parts):
            raise UserError(f"Setting {key!r} must stay inside its output folder (no absolute path, no '..'), "
                            f"got {_shown(value)}.")
    problem = unsafe_value_problem(value, f"Setting {key!r}")  # lone surrogates, integers beyond 64 bits
    if problem:
        raise UserError(problem)
    return value


MAX_LIST_ITEMS = 1000


def _names(setting: Setting, value: Any) -> list[str]:
    """A list of folder names (the disabled extensions): strings without path separators, control characters or
    '..'; repeated names once."""
    key = setting.key
    if not isinstance(value, (list, tuple)):
        raise UserError(f"Setting {key!r} must be a list of names, got {_shown(value)}.")
    if len(value) > MAX_LIST_ITEMS:
        raise UserError(f"Setting {key!r} has too many entries ({len(value)}, at most {MAX_LIST_ITEMS}).")
    names: list[str] = []
    for item in value:
        if (not isinstance(item, str) or not item or len(item) > 255 or item in (".", "..")
                or any(ch in item for ch in "/\\") or any(ord(ch) < 32 or ord(ch) == 127 for ch in item)):
            raise UserError(f"Setting {key!r}: each entry must be a folder name, got {_shown(item)}.")
        if item not in names:
            names.append(item)
    return names


# List settings whose entries name model files (paths or names): checked here as text, and by the app's value check
# (`Options.add_value_check`) against the files in their folders.
FILE_LIST_KEYS = ("forge_additional_modules",)


def _file_names(setting: Setting, value: Any) -> list[str]:
    """A list of model file names or paths (Forge's `forge_additional_modules`): non-empty strings without control
    characters, at most MAX_TEXT_LENGTH each; repeated entries once. A single string is one entry."""
    key = setting.key
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, (list, tuple)):
        raise UserError(f"Setting {key!r} must be a list of file names, got {_shown(value)}.")
    if len(value) > MAX_LIST_ITEMS:
        raise UserError(f"Setting {key!r} has too many entries ({len(value)}, at most {MAX_LIST_ITEMS}).")
    names: list[str] = []
    for item in value:
        if (not isinstance(item, str) or not item.strip() or len(item) > MAX_TEXT_LENGTH
                or any(ord(ch) < 32 or ord(ch) == 127 for ch in item)):
            raise UserError(f"Setting {key!r}: each entry must be a file name, got {_shown(item)}.")
        if item not in names:
            names.append(item)
    return names


def _number(setting: Setting, value: Any) -> int | float:
    key, kind = setting.key, setting.kind
    wanted = "a whole number" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"Setting {key!r} must be {wanted}, got {_shown(value)}.")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"Setting {key!r} must be {wanted}, got {_shown(value)}.") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"Setting {key!r} must be a finite number, got {_shown(value)}.")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"Setting {key!r} must be a whole number, got {_shown(value)}.")
        return int(value)
    if kind is float:
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"Setting {key!r} must be a finite number, got {_shown(value)}.") from None
    return value


class Options:
    """Thread-safe settings store backed by a JSON file, and the one gate for changing it.

    Every change, whatever its source (Settings tab, quick settings, `/sdapi/v1/options`, a job's
    `override_settings`, pasted infotext), goes through `check`: types, ranges, choices, output folders inside
    `DATA_DIR/outputs`, name patterns that stay in their folder, the names only the app can resolve (checkpoint,
    VAE: `add_value_check`), `--hide-ui-dir-config` and `--freeze-settings`.
    """

    def __init__(self, path: Path | None, data_dir: Path, frozen: bool = False, hide_dir_config: bool = False):
        self.path = path
        self.data_dir = data_dir
        self.frozen = frozen
        self.hide_dir_config = hide_dir_config
        self._lock = threading.Lock()
        # the settings table: SETTINGS, and those extensions register at start-up (`register`)
        self._settings: dict[str, Setting] = dict(SETTINGS_BY_KEY)
        self._values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
        self._extra: dict[str, Any] = {}
        self._listeners: list[Callable[[str, Any], None]] = []
        self._value_checks: dict[str, Callable[[Any], Any]] = {}
        if path is not None and path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"The settings file {path} is not valid JSON ({exc}); fix or delete it.") from exc
            if not isinstance(stored, dict):
                raise UserError(f"The settings file {path} does not hold a JSON object; fix or delete it.")
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

    def settings(self) -> list[Setting]:
        """The settings table: Easel's own, then those registered by extensions (`register`)."""
        return list(self._settings.values())

    def setting(self, key: str) -> Setting | None:
        return self._settings.get(key)

    def register(self, setting: Setting) -> None:
        """Add an extension's setting (an `easel_extension.py`'s `add_setting`, or A1111's `on_ui_settings` +
        `shared.opts.add_option`), at start-up before
        the settings are used: it then passes the gate (`check`) and shows in the Settings tab and
        `/sdapi/v1/options`. A value config.json already holds for it (kept verbatim until now) is checked as the
        setting holds it; a stale one falls back to the default. Easel's own settings cannot be replaced."""
        if setting.key in SETTINGS_BY_KEY:
            raise ValueError(f"setting {setting.key!r} is one of Easel's own and cannot be registered again")
        if setting.key in self._settings:
            raise ValueError(f"setting {setting.key!r} already exists (another extension registered it)")
        coerce(setting, setting.default)  # a default the setting itself refuses is the extension's bug
        with self._lock:
            self._settings[setting.key] = setting
            value = setting.default
            if setting.key in self._extra:
                try:
                    value = coerce(setting, self._extra.pop(setting.key))
                except UserError:
                    pass
            self._values[setting.key] = value

    def on_change(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    def add_value_check(self, key: str, check: Callable[[Any], Any]) -> None:
        """Add a check that needs what the app knows (the checkpoint and VAE files): `check(value)` returns the value
        to keep (e.g. the checkpoint's full title) or raises UserError."""
        self._value_checks[key] = check

    def _coerce(self, setting: Setting, value: Any) -> Any:
        value = coerce(setting, value)
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

    def check(self, changes: Any, *, per_job: bool = False, from_flags: bool = False) -> dict[str, Any]:
        """The one gate: `changes` checked and coerced, or a UserError naming the setting (400: a bad value;
        403: a folder outside `DATA_DIR/outputs`, `--hide-ui-dir-config`, `--freeze-settings`; 404: no such
        checkpoint or VAE). Nothing is stored.

        `per_job`: the changes last one job (`override_settings` restored afterwards). Under `--freeze-settings`
        a job may still override `PER_JOB_WHEN_FROZEN`; keys that are not settings are left out (a job reads only
        settings), where a stored change keeps them verbatim, as A1111 does. A value equal to the current one is
        no change and passes the two flags (clients post back the whole options dict, as A1111 allows).
        `from_flags`: the operator's own command-line choice (`--ckpt`), not refused by the two flags.
        """
        if not isinstance(changes, dict):
            raise UserError(f"Settings must be a JSON object of setting names and values, got {_shown(changes)}.")
        current = self.as_dict()
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if not isinstance(key, str) or not key:
                raise UserError(f"Setting names must be non-empty strings, got {_shown(key)}.")
            setting = self._settings.get(key)
            if setting is None and per_job:
                continue
            if setting is None:
                check_value({key: value}, status=400)  # kept verbatim: it must still be writable as JSON
            if setting is not None:
                value = self._coerce(setting, value)
            unchanged = key in current and value == current[key]
            if not unchanged and key in self._value_checks:
                try:
                    value = self._value_checks[key](value)
                except UserError as exc:
                    message = exc.message if key in exc.message else f"Setting {key!r}: {exc.message}"
                    raise UserError(message, status=exc.status) from exc
                unchanged = value == current.get(key)
            if not unchanged and not from_flags:
                self._check_allowed(key, per_job)
            checked[key] = value
        return checked

    def _check_allowed(self, key: str, per_job: bool) -> None:
        if self.hide_dir_config and key in OUTPUT_DIR_KEYS:
            raise UserError(f"Setting {key!r}: output folders cannot be changed on this server "
                            f"(--hide-ui-dir-config).", status=403)
        if self.frozen and not (per_job and key in PER_JOB_WHEN_FROZEN):
            if per_job:
                raise UserError(f"Setting {key!r} cannot be overridden: settings are frozen on this server "
                                f"(--freeze-settings); a job may override only {', '.join(PER_JOB_WHEN_FROZEN)}.",
                                status=403)
            raise UserError(f"Setting {key!r} cannot be changed: settings are frozen on this server "
                            f"(--freeze-settings).", status=403)

    def update(self, changes: dict[str, Any], *, from_flags: bool = False) -> dict[str, Any]:
        """Check `changes` through the gate (`check`), then store them in config.json; returns the stored values.
        Keys that are not settings are kept verbatim (as A1111 does) and returned by `as_dict`, never read by
        Easel; the new or changed ones are listed in a log warning."""
        coerced = self.check(changes, from_flags=from_flags)
        with self._lock:
            unknown = sorted(k for k, v in coerced.items()
                             if k not in self._settings and (k not in self._extra or self._extra[k] != v))
            for key, value in coerced.items():
                if key in self._settings:
                    self._values[key] = value
                else:
                    self._extra[key] = value
        if unknown:  # repr: a key is the client's text, never a line of its own in the log
            log.warning("settings unknown to Easel were stored as given (they have no effect here): %s",
                        ", ".join(repr(k)[:100] for k in unknown[:50]) + (f" and {len(unknown) - 50} more"
                                                                           if len(unknown) > 50 else ""))
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
