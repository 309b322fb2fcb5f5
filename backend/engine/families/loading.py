"""Loading a FLUX.1 or Stable Diffusion 3 model from the files people share, into one `FlowModel`.

A model of these families comes in parts: the transformer, a 16-channel VAE and text encoders (CLIP-L and T5-XXL
for FLUX; CLIP-L, CLIP-G and optionally T5-XXL for SD3). A file may hold all of them (an all-in-one checkpoint as
ComfyUI and Forge save it: `model.diffusion_model.` the transformer, `first_stage_model.` or `vae.` the VAE,
`text_encoders.<part>.transformer.` each encoder) or the transformer alone (Black Forest Labs' `flux1-dev.safetensors`,
a GGUF file). The parts a file lacks come from the files the user chose in "VAE / Text Encoder" (setting
`forge_additional_modules`, as Forge), each recognised by its tensors (`text_encoders.classify_part`); a part chosen
there replaces the checkpoint's own, as in Forge. When a part is still missing the user is told which, and where
to put it, before the large file is read.

The worker asks `detect_family_of_file` (the header only) whether a checkpoint goes here or to
`model_loader.load_sd_model`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import UserError
from backend.core.unet_layout import FAMILY_NAMES, MISSING_PARTS_STATUS

log = logging.getLogger("easel.families")

GGUF_SUFFIX = ".gguf"
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_PARTS = ("clip_l", "clip_g", "t5xxl")
# Where an all-in-one file keeps each text encoder (ComfyUI's and Forge's layout), longest first.
TEXT_PREFIXES = {part: (f"text_encoders.{part}.transformer.", f"text_encoders.{part}.") for part in TEXT_PARTS}

# The parts each family needs, and those it uses when given.
REQUIRED_PARTS = {"flux": ("vae", "clip_l", "t5xxl"), "sd3": ("vae", "clip_l", "clip_g")}
OPTIONAL_PARTS = {"flux": (), "sd3": ("t5xxl",)}
PART_NAMES = {"vae": "VAE", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
# The file names the parts are shared under, for the message naming a missing one.
PART_FILES = {
    "flux": {"vae": "ae.safetensors", "clip_l": "clip_l.safetensors",
             "t5xxl": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors"},
    "sd3": {"vae": "the SD3 VAE, e.g. diffusion_pytorch_model.safetensors of the model's vae folder",
            "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
            "t5xxl": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors"},
}
# The latent scaling of each family's VAE (latents = (mean - shift) * scale).
VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
# FLUX's flow shift, as Forge and ComfyUI set it: exp(mu) with mu 1.15 (dev) or 1.0 (schnell); SD3's is 3.0.
FLUX_MU = {"flux-dev": 1.15, "flux-schnell": 1.0}
SD3_SHIFT = 3.0
SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
# Names only a diffusion transformer's tensors have (BFL's FLUX blocks, SAI's MMDiT blocks, diffusers' layouts):
# a file without any is neither family, and `flux.is_flux` / `sd3.is_sd3` decide for the others.
TRANSFORMER_MARKERS = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.", "x_embedder.",
                       "context_embedder.")


# -- what a file is, from its header ---------------------------------------------------------------
def read_file_keys(path: Path) -> list[str]:
    """The tensor names of a model file, read from its header (`.safetensors`, pickles, `.gguf`)."""
    from backend.core.tensor_headers import read_shapes
    return list(read_shapes(Path(path)))


def transformer_keys(keys) -> list[str]:
    """The names of the transformer's tensors without prefix: those under `model.diffusion_model.` when the file
    has them (an all-in-one file), else every tensor that is not a VAE or text encoder part."""
    keys = list(keys)
    prefixed = [k[len(TRANSFORMER_PREFIX):] for k in keys if k.startswith(TRANSFORMER_PREFIX)]
    if prefixed:
        return prefixed
    others = VAE_PREFIXES + tuple(p for prefixes in TEXT_PREFIXES.values() for p in prefixes)
    return [k for k in keys if not k.startswith(others)]


def flow_family_of_keys(keys) -> str | None:
    """"flux" or "sd3" when the tensor names are a FLUX.1 or SD3 model's (with or without its other parts), else
    None."""
    names = transformer_keys(keys)
    if not any(marker in k for k in names for marker in TRANSFORMER_MARKERS):
        return None  # no transformer block at all: not worth asking the families (nor importing them)
    from backend.engine.families import flux, sd3

    if flux.is_flux(names):
        return "flux"
    if sd3.is_sd3(names):
        return "sd3"
    return None


def sd_family_of_keys(keys) -> str | None:
    """The Stable Diffusion family ("sd1", "sd2", "sdxl", "sdxl_refiner") of an A1111-layout checkpoint's tensor
    names, as `model_detection.detect_checkpoint` tells them apart (its text encoders' prefixes); None when the
    names are not an SD checkpoint's."""
    from backend.engine import model_detection as md

    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(md.UNET_PREFIX + "input_blocks."):
        return None
    if has(md.SDXL_TEXT1_PREFIX) and has(md.SDXL_TEXT2_PREFIX):
        return "sdxl"
    if has(md.SDXL_REFINER_TEXT_PREFIX) and not has(md.SDXL_TEXT1_PREFIX):
        return "sdxl_refiner"
    if has(md.SD1_TEXT_PREFIX):
        return "sd1"
    if has(md.SD2_TEXT_PREFIX):
        return "sd2"
    return None


def detect_family_of_file(path: Path) -> str:
    """The family of a checkpoint file from its header alone (no weights read): "flux" or "sd3" (loaded by
    `load_flow_checkpoint`), one of `SD_FAMILIES`, or "unknown" (left to `load_sd_model`, whose message says what
    the file looks like). A `.gguf` file is always a transformer of a flow family or refused here."""
    path = Path(path)
    keys = read_file_keys(path)
    family = sd_family_of_keys(keys)  # first: an SD checkpoint never needs the transformer modules imported
    if family is not None:
        return family
    family = flow_family_of_keys(keys)
    if family is not None:
        return family
    if path.suffix.lower() == GGUF_SUFFIX:
        raise UserError(f"{path.name} is a GGUF file but not a FLUX.1 or Stable Diffusion 3 transformer; Easel loads "
                        f"GGUF files of those two families only.")
    return "unknown"


# -- the parts of a file ---------------------------------------------------------------------------
def parts_in_keys(keys) -> set[str]:
    """The parts an all-in-one file holds, by the prefixes of its tensor names ("transformer" always: a file
    without `model.diffusion_model.` is the transformer alone)."""
    found = {"transformer"}
    for key in keys:
        if key.startswith(VAE_PREFIXES):
            found.add("vae")
        else:
            for part, prefixes in TEXT_PREFIXES.items():
                if key.startswith(prefixes):
                    found.add(part)
    return found


def split_by_prefix(state_dict: dict) -> dict[str, dict]:
    """An all-in-one file's tensors by part, prefixes removed: {"transformer": ..., "vae": ..., "clip_l": ..., ...}
    (only the parts it holds). A file without `model.diffusion_model.` is the transformer alone."""
    has_prefix = any(k.startswith(TRANSFORMER_PREFIX) for k in state_dict)
    parts: dict[str, dict] = {}
    for key, value in state_dict.items():
        part, name = _part_of_key(key)
        if part is None:
            if has_prefix:
                continue  # stray tensors beside the prefixed parts (e.g. a merger's bookkeeping)
            part, name = "transformer", key
        parts.setdefault(part, {})[name] = value
    return parts


def _part_of_key(key: str) -> tuple[str | None, str]:
    if key.startswith(TRANSFORMER_PREFIX):
        return "transformer", key[len(TRANSFORMER_PREFIX):]
    for prefix in VAE_PREFIXES:
        if key.startswith(prefix):
            return "vae", key[len(prefix):]
    for part, prefixes in TEXT_PREFIXES.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                return part, key[len(prefix):]
    return None, key


def _prefixes_of(parts) -> tuple[str, ...]:
    out: list[str] = []
    for part in parts:
        if part == "vae":
            out += VAE_PREFIXES
        elif part in TEXT_PREFIXES:
            out += TEXT_PREFIXES[part]
    return tuple(out)


def strip_part_prefix(state_dict: dict) -> dict:
    """A separate part's tensors with the all-in-one prefix removed when every name carries the same one (a VAE
    saved as `first_stage_model.*`, an encoder as `text_encoders.clip_l.transformer.*`); otherwise as it is."""
    if not state_dict:
        return state_dict
    for prefix in VAE_PREFIXES + tuple(p for prefixes in TEXT_PREFIXES.values() for p in prefixes):
        if all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_model_file(path: Path, *, exclude_prefixes: tuple[str, ...] = ()) -> dict:
    """All tensors of a model file: `.gguf` through `quantized.read_gguf` (quantized tensors kept quantized), the
    others through `state_dict_io.read_state_dict`."""
    path = Path(path)
    if path.suffix.lower() == GGUF_SUFFIX:
        from backend.engine.families import quantized
        state_dict = quantized.read_gguf(path)
        return {k: v for k, v in state_dict.items() if not (exclude_prefixes and k.startswith(exclude_prefixes))}
    from backend.engine.state_dict_io import read_state_dict
    return read_state_dict(path, exclude_prefixes=exclude_prefixes)


@dataclass
class ChosenPart:
    """A file chosen in "VAE / Text Encoder", recognised from its header (read in full only when it is loaded)."""

    part: str  # "vae" | "clip_l" | "clip_g" | "t5xxl"
    path: Path

    def read(self) -> dict:
        return strip_part_prefix(read_model_file(self.path))


def classify_file(path: Path) -> str:
    """What part a file is (`text_encoders.classify_part`), from its header's names and shapes when that tells
    (no weights read: a T5-XXL is 5-10 GB), else from its tensors. A UserError names the file."""
    from backend.core.tensor_headers import read_shapes
    from backend.engine.families import text_encoders

    path = Path(path)
    try:
        try:
            return text_encoders.classify_part(strip_part_prefix(read_shapes(path)))
        except UserError:
            raise
        except Exception:  # noqa: BLE001  the classification needed the tensors themselves
            return text_encoders.classify_part(strip_part_prefix(read_model_file(path)))
    except UserError as exc:
        raise UserError(f"VAE / Text Encoder: {path.name}: {exc.message}", status=exc.status) from exc


def read_additional_parts(additional, family: str) -> list[ChosenPart]:
    """The chosen files the family uses, recognised, in the order chosen. A file of a part the family does not use
    (CLIP-G for FLUX) is passed over; two files for one part are refused."""
    used = REQUIRED_PARTS[family] + OPTIONAL_PARTS[family]
    chosen: dict[str, ChosenPart] = {}
    for path in additional or ():
        path = Path(path)
        part = classify_file(path)
        if part not in used:
            log.info("%s (%s) is not used by %s models; passed over", path.name, PART_NAMES.get(part, part),
                     FAMILY_NAMES[family])
            continue
        if part in chosen:
            raise UserError(f"VAE / Text Encoder: two files were chosen for the {PART_NAMES[part]} part "
                            f"({chosen[part].path.name} and {path.name}); choose one.")
        chosen[part] = ChosenPart(part, path)
    return list(chosen.values())


def missing_parts_message(family: str, checkpoint: str, missing: list[str]) -> str:
    """What the user reads when parts are missing: which, the files they are shared as, and where to put them."""
    name = FAMILY_NAMES[family]
    files = PART_FILES[family]
    listed = ", ".join(f"{PART_NAMES[p]} ({files[p]})" for p in missing)
    needs = " and ".join(PART_NAMES[p] for p in REQUIRED_PARTS[family])
    folders = " and ".join(dict.fromkeys("models/VAE" if p == "vae" else "models/text_encoder" for p in missing))
    optional = "".join(f"; {PART_NAMES[p]} is optional" for p in OPTIONAL_PARTS[family])
    return (f"{checkpoint} is a {name} model without its {listed}. {name} needs {needs}{optional}: put the missing "
            f"files in {folders} and choose them in 'VAE / Text Encoder' beside the checkpoint (setting "
            f"forge_additional_modules).")


# -- loading ---------------------------------------------------------------------------------------
def load_flow_checkpoint(path: Path, additional: list[Path], *, dtype, vae_dtype=None, text_dtype=None,
                         device="cpu", models_dir: Path | None = None):
    """Load a FLUX.1 or SD3 model from `path` (an all-in-one or transformer-only `.safetensors`, `.ckpt` or `.gguf`
    file) completed with the `additional` part files (VAE, text encoders). `dtype` is the transformer's,
    `vae_dtype` / `text_dtype` (default `dtype`) the VAE's and the text encoders'. -> `FlowModel`.

    Checks which parts are present before reading the large file: a missing one is a UserError naming it and
    where to put it."""
    from backend.engine.families.flow_model import FlowModel

    path = Path(path)
    vae_dtype = vae_dtype or dtype
    text_dtype = text_dtype or dtype
    keys = read_file_keys(path)
    family = flow_family_of_keys(keys)
    if family is None:
        raise UserError(f"{path.name} is not a FLUX.1 or Stable Diffusion 3 model.")
    name = FAMILY_NAMES[family]

    chosen = read_additional_parts(additional, family)
    own = parts_in_keys(keys)
    available = own | {c.part for c in chosen}
    missing = [p for p in REQUIRED_PARTS[family] if p not in available]
    if missing:
        raise UserError(missing_parts_message(family, path.name, missing), status=MISSING_PARTS_STATUS)

    replaced = {c.part for c in chosen if c.part in own}  # a chosen part replaces the checkpoint's own
    state_dict = read_model_file(path, exclude_prefixes=_prefixes_of(replaced))
    if family == "sd3":
        from backend.engine.families import sd3
        parts = sd3.split_sd3_checkpoint(state_dict)
    else:
        parts = split_by_prefix(state_dict)
    del state_dict
    sources = {part: path.name for part in parts}
    for c in chosen:
        parts[c.part] = c  # read when its turn comes: one part's tensors in memory besides the built modules
        sources[c.part] = c.path.name
    modules = [c.path.name for c in chosen]  # in the order chosen (the infotext's Module 1, 2, ...)
    del chosen

    def take(part: str) -> dict:
        found = parts.pop(part)
        return found.read() if isinstance(found, ChosenPart) else found

    if family == "flux":
        from backend.engine.families import flux
        transformer = flux.load_flux_transformer(take("transformer"), dtype=dtype, device=device)
    else:
        from backend.engine.families import sd3
        transformer = sd3.load_sd3_transformer(take("transformer"), dtype=dtype, device=device)

    from backend.engine.families import flow_vae
    vae = flow_vae.load_flow_vae(take("vae"), family=family, dtype=vae_dtype, device=device)

    from backend.engine.families import text_encoders
    loaders = {"clip_l": text_encoders.load_clip_l, "clip_g": text_encoders.load_clip_g,
               "t5xxl": text_encoders.load_t5xxl}
    encoders, tokenizers = {}, {}
    for part in REQUIRED_PARTS[family][1:] + OPTIONAL_PARTS[family]:
        if part not in parts:
            continue
        encoders[part] = loaders[part](take(part), dtype=text_dtype, device=device)
        tokenizers[part] = _tokenizer(part, models_dir)
    parts.clear()

    variant = flow_variant(family, transformer)
    scale, shift_factor = VAE_FACTORS[family]
    guidance = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False)) if family == "flux" \
        else False
    used = {"transformer": path.name, "vae": sources["vae"],
            **{part: sources[part] for part in encoders}}
    log.info("%s: %s (%s) with %s", path.name, name, variant,
             ", ".join(f"{PART_NAMES.get(p, p)} from {f}" for p, f in used.items() if p != "transformer"))
    return FlowModel(family=family, variant=variant, transformer=transformer, vae=vae, text_encoders=encoders,
                     tokenizers=tokenizers, vae_scale_factor=scale, vae_shift_factor=shift_factor,
                     shift=flow_shift(variant), guidance_embeds=guidance, parts=used, modules=modules)


def _tokenizer(part: str, models_dir: Path | None):
    if part == "t5xxl":
        from backend.engine.families.t5_tokenizer import t5_tokenizer
        if models_dir is None:
            raise ValueError("models_dir is needed to find the T5 tokenizer")
        return t5_tokenizer(Path(models_dir))
    return _clip_tokenizer(part)


def _clip_tokenizer(part: str):
    from backend.engine.tokenizer import clip_tokenizer
    return clip_tokenizer(part)


def flow_variant(family: str, transformer) -> str:
    """The variant, from the loaded transformer's config: FLUX dev (guidance embedding) or schnell; SD3 Medium
    (24 blocks), SD 3.5 Medium (MMDiT-X: dual attention blocks), SD 3.5 Large (38 blocks)."""
    config = getattr(transformer, "config", None)
    get = (lambda key, default=None: getattr(config, key, default)) if config is not None else \
        (lambda key, default=None: default)
    if family == "flux":
        return "flux-dev" if get("guidance_embeds", False) else "flux-schnell"
    if get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large" if int(get("num_layers", 24) or 24) >= 38 else "sd3-medium"


def flow_shift(variant: str) -> float:
    """The flow schedule's shift of a variant: FLUX exp(mu) (Forge's mu), SD3 3.0."""
    if variant in FLUX_MU:
        return math.exp(FLUX_MU[variant])
    return SD3_SHIFT
