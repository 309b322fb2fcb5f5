"""The Checkpoint Merger's request and the rules both processes share (torch-free).

AUTOMATIC1111's merger (`modules/extras.py` `run_modelmerger`), as facts:
- "Weighted sum": A * (1 - M) + B * M; "Add difference": A + (B - C) * M; "No interpolation": A alone (to bake
  a VAE, convert the format, change the precision or discard weights).
- Only tensors whose name contains "model" are merged (in the A1111 layout that leaves out the noise schedule
  buffers); the CLIP `position_ids` are never merged. A key of A missing from B keeps A's value; in Add
  difference a key of B missing from C adds nothing. Keys only in B are not written.
- An inpainting (9 input channels) or instruct-pix2pix (8) model A merged with a regular one B: the first 4
  input channels are merged, A's extra channels kept, and the name gets `.inpainting` / `.instruct-pix2pix`.
- The default name is `0.7(A) + 0.3(B)`, `A + 0.3(B - C)` or `A` (model names), then the format's extension.
- Metadata (safetensors only): the sources' metadata copied, the user's JSON, `format: pt`, and the recipe as
  `sd_merge_recipe` (JSON) and `sd_merge_models` ({sha256: {name, legacy_hash, sd_merge_recipe}}).

Easel's differences, beside the memory (tensor by tensor): files of another family are refused before anything
is read (A1111 fails half-way with a shape error); layouts without a `model` prefix (FLUX/SD 3 transformer-only
files) merge every float tensor; an existing file is never overwritten (A1111 overwrites); the name may not hold
a path; "Save as float16" turns every float32 tensor into float16 (A1111 leaves A's tensors missing from B).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from backend.core.errors import UserError
from backend.core.schemas import JsonRequest

INTERP_METHODS = ("No interpolation", "Weighted sum", "Add difference")
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")
CHECKPOINT_FORMATS = ("safetensors", "ckpt")
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
EMA_PREFIX = "model_ema."

# A1111's `checkpoint_dict_replacements`: CLIP keys of old transformers versions, read under today's names.
_KEY_REPLACEMENTS = (
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
)

FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL",
                 "sdxl_refiner": "SDXL refiner", "sd3": "Stable Diffusion 3", "flux": "FLUX.1"}


class MergeRequest(JsonRequest):
    """`POST /easel/v1/merge-checkpoints` and the Checkpoint Merger tab: A1111's `run_modelmerger` arguments."""

    primary_model_name: str = Field(..., description="Primary model (A): a checkpoint title, name or hash")
    secondary_model_name: str | None = Field(None, description="Secondary model (B)")
    tertiary_model_name: str | None = Field(None, description="Tertiary model (C)")
    interp_method: Literal["No interpolation", "Weighted sum", "Add difference"] = "Weighted sum"
    multiplier: float = Field(0.3, ge=0.0, le=1.0, description="M")
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: Literal["safetensors", "ckpt"] = "safetensors"
    config_source: Literal["A, B or C", "B", "C", "Don't"] | int = "A, B or C"
    bake_in_vae: str = "None"
    discard_weights: str = ""
    prune_ema: bool = Field(False, description="Easel: leave out the model_ema.* weights")
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: str = "{}"

    def config_choice(self) -> str:
        value = self.config_source
        if isinstance(value, int):  # A1111's radio sends the index
            if not 0 <= value < len(CONFIG_SOURCES):
                raise UserError(f"config_source {value} is not one of 0-{len(CONFIG_SOURCES) - 1} "
                                f"({', '.join(CONFIG_SOURCES)}).", status=422)
            return CONFIG_SOURCES[value]
        return value


def normalize_key(key: str) -> str:
    for old, new in _KEY_REPLACEMENTS:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_family(keys) -> str:
    """The model family of a checkpoint from its tensor names ("unknown" when none fits)."""
    keys = list(keys)
    starts = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if starts("conditioner.embedders.0.transformer.") and starts("conditioner.embedders.1.model."):
        return "sdxl"
    if starts("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has("joint_blocks.") and has("x_embedder"):
        return "sd3"
    if has("double_blocks.") and has("single_blocks."):
        return "flux"
    if starts("cond_stage_model.transformer."):
        return "sd1"
    if starts("cond_stage_model.model."):
        return "sd2"
    return "unknown"


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, "an unrecognised model type")


def has_model_names(keys) -> bool:
    """Whether a file uses the A1111 layout, where the weights' names hold "model" (A1111 merges only those)."""
    return any("model" in k for k in keys)


def is_merged_key(key: str, model_layout: bool) -> bool:
    """Whether A1111's rule merges this key (`'model' in key`, not the CLIP position ids)."""
    if key in SKIP_ON_MERGE:
        return False
    return "model" in key if model_layout else True


def channel_merge(a_shape: tuple, b_shape: tuple, key: str, a_label: str = "A", b_label: str = "B") -> str | None:
    """How a tensor of shape `a_shape` merges with one of `b_shape`: None (same shape), "inpainting" or
    "instruct-pix2pix" (A's first 4 input channels are merged); a `UserError` when they cannot merge."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if a_shape == b_shape:
        return None
    if len(a_shape) == 4 and len(b_shape) == 4 and a_shape[:1] + a_shape[2:] == b_shape[:1] + b_shape[2:]:
        if b_shape[1] in (8, 9) and a_shape[1] == 4:
            kind = "inpainting" if b_shape[1] == 9 else "instruct-pix2pix"
            raise UserError(f"When merging an {kind} model with a normal one, {a_label} must be the {kind} model "
                            f"({key}: {a_label} {list(a_shape)}, {b_label} {list(b_shape)}).")
        if a_shape[1] in (8, 9) and b_shape[1] == 4:
            return "inpainting" if a_shape[1] == 9 else "instruct-pix2pix"
    raise UserError(f"The models do not fit together: {key} has shape {list(a_shape)} in {a_label} and "
                    f"{list(b_shape)} in {b_label} (different architectures or sizes).")


def default_name(method: str, multiplier: float, a: str, b: str | None, c: str | None) -> str:
    """A1111's file name (without extension) from the model names and the method."""
    if method == "Weighted sum":
        return f"{round(1 - multiplier, 2)}({a}) + {round(multiplier, 2)}({b})"
    if method == "Add difference":
        return f"{a} + {round(multiplier, 2)}({b} - {c})"
    return a


_FORBIDDEN = re.compile(r"[/\\\x00-\x1f]")


def output_file_name(custom_name: str, generated: str, suffix: str, fmt: str) -> str:
    """The merged file's name in the checkpoint folder: the custom name (or A1111's generated one), the
    `.inpainting`/`.instruct-pix2pix` suffix, the format's extension. A name that is a path is refused."""
    name = custom_name.strip()
    if name.lower().endswith("." + fmt):  # "my-merge.safetensors": not twice
        name = name[: -len(fmt) - 1]
    if custom_name and not name:
        raise UserError("Custom name: give a file name (or leave it empty for the generated one).")
    if name and (_FORBIDDEN.search(name) or name.startswith(".")):
        raise UserError(f"Custom name {custom_name!r} is not a plain file name: it may not hold path separators, "
                        f"control characters or start with a dot. The merge is saved in the checkpoint folder.")
    base = name or _FORBIDDEN.sub("_", generated)
    filename = base + (f".{suffix}" if suffix else "") + "." + fmt
    if len(filename.encode("utf-8")) > 250:
        raise UserError(f"The file name would be {len(filename.encode('utf-8'))} bytes long; the limit is 250. "
                        "Give a shorter custom name.")
    return filename


def discard_pattern(discard_weights: str) -> re.Pattern | None:
    if not discard_weights:
        return None
    try:
        return re.compile(discard_weights)
    except re.error as exc:
        raise UserError(f"Discard weights with matching name: {discard_weights!r} is not a valid regular expression "
                        f"({exc}).") from None


def legacy_hash(path: Path) -> str:
    """A1111's old 8-digit model hash: sha256 of 64 KiB at offset 1 MiB."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except OSError:
        return "NOFILE"


def _parsed(value):
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def merge_metadata(req: MergeRequest, sources: list[dict], *, is_inpainting: bool, is_ip2p: bool,
                   warnings: list[str]) -> dict[str, str]:
    """The merged file's safetensors metadata, as A1111 writes it. `sources`: for A, B, C (those used)
    {"name", "sha256", "legacy_hash", "metadata" (their own safetensors metadata, strings)}."""
    if not req.save_metadata:
        return {}
    metadata: dict[str, str] = {}
    if req.copy_metadata_fields:
        for src in sources:
            metadata.update(src.get("metadata") or {})
    try:
        extra = json.loads(req.metadata_json or "{}")
        if not isinstance(extra, dict):
            raise ValueError("it is not a JSON object")
        metadata.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    except ValueError as exc:
        warnings.append(f"Metadata in JSON format was not used: {exc}.")
    metadata["format"] = "pt"
    if req.add_merge_recipe:
        hashes = [s["sha256"] for s in sources] + [None, None]
        recipe = {"type": "webui", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
                  "tertiary_model_hash": hashes[2], "interp_method": req.interp_method, "multiplier": req.multiplier,
                  "save_as_half": req.save_as_half, "custom_name": req.custom_name,
                  "config_source": CONFIG_SOURCES.index(req.config_choice()), "bake_in_vae": req.bake_in_vae,
                  "discard_weights": req.discard_weights, "is_inpainting": is_inpainting,
                  "is_instruct_pix2pix": is_ip2p}
        models: dict = {}
        for src in sources:
            own = src.get("metadata") or {}
            models[src["sha256"]] = {"name": src["name"], "legacy_hash": src["legacy_hash"],
                                     "sd_merge_recipe": _parsed(own.get("sd_merge_recipe"))}
            earlier = _parsed(own.get("sd_merge_models"))
            if isinstance(earlier, dict):
                models.update(earlier)
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(models)
    return metadata
