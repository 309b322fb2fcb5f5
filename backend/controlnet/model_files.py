"""ControlNet model files: find them, tell what they are from their tensors' names and shapes (no torch).

Layouts read:
- the original single-file layout of lllyasviel's ControlNet 1.0/1.1 (`control_v11p_sd15_canny.pth`,
  `.safetensors`, fp16 "pruned" copies): keys `control_model.*` (or the same keys without the
  prefix), an LDM UNet encoder (`input_blocks.*`, `middle_block.*`, `time_embed.*`, `label_emb.*`)
  plus `input_hint_block.*` (the hint encoder), `zero_convs.N.0.*` and `middle_block_out.0.*`.
  ControlNet 1.0 files that bundle a whole SD model beside `control_model.*` are read the same way.
- the diffusers layout, as SDXL ControlNets are downloaded (`diffusion_pytorch_model.safetensors`
  renamed, `diffusers_xl_canny_full.safetensors`, ...): `controlnet_cond_embedding.*`,
  `down_blocks.*`, `controlnet_down_blocks.N.*`, `controlnet_mid_block.*`.

As `backend.engine.model_detection` does for checkpoints, the architecture is read from the shapes
(levels, blocks, transformer depths, context width, linear or conv projections, SDXL's size
embedding), so a real SD 1.5 ControlNet and a tiny test file go through the same code. The app reads
the shapes from the file's header (`backend.core.tensor_headers`) to list the models that fit a
checkpoint; the backend loads the weights (`backend.engine.controlnet.model_files`).
Family: `label_emb`/`add_embedding` -> sdxl; linear `proj_in` -> sd2; conv `proj_in` -> sd1.

FLUX.1 ControlNets (family "flux"):
- InstantX / Shakker-Labs (diffusers' `FluxControlNetModel` layout, layout "diffusers"): `x_embedder`,
  `controlnet_x_embedder`, `transformer_blocks.N.*`, `single_transformer_blocks.N.*`, `controlnet_blocks.N`,
  `controlnet_single_blocks.N`; the union models add `controlnet_mode_embedder` (one row per control mode:
  `num_mode`). They take the control image as VAE latents.
- XLabs (x-flux's own file, layout "xlabs"): a small FLUX in Black Forest Labs' names (`img_in`, `txt_in`,
  `time_in`, `vector_in`, `guidance_in`, `double_blocks.N.*`) plus `controlnet_blocks.N`, `pos_embed_input` and a
  convolutional hint encoder `input_hint_block.{0,2,..,14}` reading the control image's pixels; loaded as a
  `FluxControlNetModel` with `conditioning_embedding_channels` 16 and 2x2 patches (`patch_size` 2).
The config is `FluxControlNetModel`'s kwargs without the rotary axes (the engine derives them from the head size).

Model names are listed as sd-webui-controlnet lists them: `control_v11p_sd15_canny [d14c016b]`,
the bracket holding A1111's legacy short hash (sha256 of 64 KiB at offset 1 MiB, 8 hex digits).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.errors import UserError
from backend.core.paths import list_files
from backend.core.tensor_headers import read_shapes
from backend.core.unet_layout import FAMILY_NAMES, GROUPS, HEAD_CHANNELS, SD1_HEADS, unet_input_levels

log = logging.getLogger(__name__)

CONTROLNET_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
LDM_PREFIX = "control_model."
SDXL_TIME_EMBED_DIM = 256  # SDXL's size/crop embedding width (2816 = 1280 pooled + 6 * 256)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet model file on disk. `name` is its path relative to the folder it was found in."""

    name: str
    path: Path
    short_hash: str

    @property
    def model_name(self) -> str:
        return os.path.splitext(os.path.basename(self.name))[0]

    @property
    def title(self) -> str:
        """As sd-webui-controlnet lists it: `control_v11p_sd15_canny [d14c016b]`."""
        return f"{self.model_name} [{self.short_hash}]"


@dataclass
class ControlNetInfo:
    """What a ControlNet file holds: family, diffusers config, layout and options."""

    family: str  # sd1 | sd2 | sdxl | flux
    config: dict  # kwargs for diffusers.ControlNetModel (FLUX: FluxControlNetModel, less `axes_dims_rope`)
    layout: str  # "ldm" | "diffusers" | "xlabs" (FLUX only)
    prefix: str = ""  # where the ControlNet's keys start in the file
    global_average_pooling: bool = False  # shuffle models: control is averaged over the image
    notes: list[str] = field(default_factory=list)

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES.get(self.family, self.family)

    @property
    def union(self) -> bool:
        """A FLUX union ControlNet: one model for several control types, told which by a mode number."""
        return self.config.get("num_mode") is not None


def legacy_short_hash(path: Path) -> str:
    """A1111's old model hash (what sd-webui-controlnet shows in brackets)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        digest.update(f.read(0x10000))
    return digest.hexdigest()[:8]


# -- finding files ------------------------------------------------------------------------------
class FileFamilies:
    """The model family (sd1 / sd2 / sdxl, or None) of files, each worked out once and remembered while
    the file keeps its path, size and modification time. Safe to use from several threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._families: dict[tuple, str | None] = {}

    def get(self, path: Path, detect: Callable[[], str | None]) -> str | None:
        """The remembered family of `path`, else `detect()`'s answer (remembered); None for a missing file."""
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime)
        with self._lock:
            if key in self._families:
                return self._families[key]
        family = detect()
        with self._lock:
            self._families[key] = family
        return family


class ControlNetRegistry:
    """The ControlNet files below the ControlNet folders; lookups accept titles, names, stems and hashes.

    The family of each file is read lazily (only the header of a `.safetensors`, the pickle of a `.pth`
    without its weights) and remembered by (path, size, mtime).
    """

    def __init__(self, folders: list[Path]):
        self.folders = folders
        self._lock = threading.Lock()
        self._families = FileFamilies()
        self.files: list[ControlNetFile] = []
        self.refresh()

    def refresh(self) -> None:
        found: dict[Path, ControlNetFile] = {}
        for folder in self.folders:
            root = folder.resolve() if folder.exists() else folder
            for path in list_files([folder], CONTROLNET_EXTENSIONS):
                if path in found or path.name.endswith(".part"):
                    continue
                try:
                    rel = path.relative_to(root)
                except ValueError:
                    rel = Path(path.name)
                try:
                    found[path] = ControlNetFile(name=str(rel).replace(os.sep, "/"), path=path, short_hash=legacy_short_hash(path))
                except OSError as exc:
                    log.warning("skipping ControlNet file %s: %s", path, exc)
        with self._lock:
            self.files = sorted(found.values(), key=lambda f: f.name.lower())

    def titles(self) -> list[str]:
        return [f.title for f in self.files]

    def find(self, query: str) -> ControlNetFile:
        """The file for a model name as clients send it (title, `name [hash]`, stem, file name or hash)."""
        q = (query or "").strip()
        files = list(self.files)
        bare = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", q)
        hash_in = re.search(r"\[([0-9a-fA-F]+)\]\s*$", q)
        for f in files:
            if q in (f.title, f.name, f.model_name, f.path.name):
                return f
        for f in files:
            if bare and bare in (f.model_name, f.name, f.path.name, f.path.stem):
                return f
        if hash_in:
            for f in files:
                if f.short_hash == hash_in.group(1).lower():
                    return f
        available = ", ".join(f.title for f in files) or "none (put ControlNet models in " + \
            " or ".join(str(d) for d in self.folders) + ")"
        raise UserError(f"ControlNet model {query!r} not found. Available: {available}", status=404)

    def family_of(self, f: ControlNetFile) -> str | None:
        """sd1 / sd2 / sdxl, or None when the file is not a ControlNet Easel can read."""
        return self._families.get(f.path, lambda: self._detect_family(f))

    @staticmethod
    def _detect_family(f: ControlNetFile) -> str | None:
        try:
            return detect_controlnet(read_shapes(f.path)).family
        except UserError as exc:
            log.warning("%s: %s", f.name, exc.message)
            return None

    def titles_for(self, family: str | None) -> list[str]:
        """Titles of the models that fit a checkpoint family (all of them when the family is unknown)."""
        if family is None:
            return self.titles()
        return [f.title for f in self.files if self.family_of(f) == family]


# -- detection ------------------------------------------------------------------------------------
def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def _first(sd: dict, pattern: str):
    rx = re.compile(pattern)
    for k, v in sd.items():
        if rx.search(k):
            return v
    return None


def _family(sd: dict, has_label_emb: bool) -> str:
    if has_label_emb:
        return "sdxl"
    proj = _first(sd, r"\.proj_in\.weight$")
    if proj is None:
        raise UserError("This ControlNet has no transformer (proj_in) layers; it is not a Stable Diffusion ControlNet.")
    return "sd2" if proj.ndim == 2 else "sd1"


def _heads(family: str, block_out: list[int]):
    return SD1_HEADS if family == "sd1" else [max(1, c // HEAD_CHANNELS) for c in block_out]


def _transformer_layers(depths: list[int], mid_depth: int) -> list[int]:
    # diffusers gives the middle block the last level's entry; levels without attention take any value.
    out = []
    for level, d in enumerate(depths):
        out.append(d if d else (mid_depth if level == len(depths) - 1 else 1))
    return out


def detect_controlnet(state_dict: dict, *, addition_time_embed_dim: int | None = None) -> ControlNetInfo:
    """Read a ControlNet file's architecture from its keys and shapes (original or diffusers layout)."""
    keys = list(state_dict.keys())
    if is_flux_controlnet(keys):
        return _detect_flux(state_dict)
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return _detect_diffusers(state_dict, addition_time_embed_dim)
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX + "input_hint_block.") for k in keys) else ""
    if not any(k.startswith(prefix + "input_hint_block.") for k in keys) or \
            not any(k.startswith(prefix + "zero_convs.") for k in keys):
        if any(k.startswith(("lora_controlnet", "down_blocks.0.resnets.0.norm1")) for k in keys):
            what = "a Control-LoRA or diffusers UNet"
        elif any(".body." in k or k.startswith("adapter.") for k in keys):
            what = "a T2I-Adapter"
        elif any(k.startswith("model.diffusion_model.") for k in keys):
            what = "a Stable Diffusion checkpoint (put it in models/Stable-diffusion)"
        else:
            what = f"not a ControlNet ({len(keys)} tensors, e.g. {', '.join(keys[:3])})"
        raise UserError(f"Unsupported ControlNet file: it looks like {what}. Easel reads ControlNet 1.0/1.1 files in "
                        "the original layout and diffusers-format ControlNets for SD 1.x, SD 2.x and SDXL, and FLUX.1 "
                        "ControlNets of InstantX, Shakker-Labs and XLabs.")
    return _detect_ldm(state_dict, prefix, addition_time_embed_dim)


def _hint_channels(sd: dict, conv_keys: list[str]) -> tuple[int, list[int]]:
    """(conditioning channels, conditioning_embedding_out_channels) from the hint encoder's convs in order."""
    shapes = [sd[k].shape for k in conv_keys]
    if len(shapes) < 2 or (len(shapes) - 2) % 2:
        raise UserError("Unsupported ControlNet: its hint encoder has an unexpected number of layers.")
    cond_channels = int(shapes[0][1])
    outs = [int(shapes[0][0])] + [int(shapes[i][0]) for i in range(2, len(shapes) - 1, 2)]
    return cond_channels, outs


def _detect_ldm(state_dict: dict, prefix: str, time_dim: int | None) -> ControlNetInfo:
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    get = lambda k: _require(sd, k, prefix)  # noqa: E731
    conv_in = get("input_blocks.0.0.weight")
    n_input = _count(sd, r"input_blocks\.(\d+)\.")
    levels = unet_input_levels(sd, n_input, "ControlNet")
    lpb = len(levels[0])
    block_out = [int(get(f"input_blocks.{level[0]}.0.out_layers.3.weight").shape[0]) for level in levels]
    depths = [[_count(sd, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.") for n in level] for level in levels]
    for level, d in enumerate(depths):
        if len(set(d)) != 1:
            raise UserError(f"Unsupported ControlNet layout: level {level} has blocks of different transformer depths.")
    depths1 = [d[0] for d in depths]
    mid_depth = _count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    has_label = "label_emb.0.0.weight" in sd
    family = _family(sd, has_label)
    to_k = _first(sd, r"\.transformer_blocks\.0\.attn2\.to_k\.weight$")
    hint_keys = sorted((k for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight")),
                       key=lambda k: int(k.split(".")[1]))
    cond_channels, cond_out = _hint_channels(sd, hint_keys)
    n_zero = _count(sd, r"zero_convs\.(\d+)\.")
    if n_zero != n_input:
        raise UserError(f"Unsupported ControlNet layout: {n_zero} zero convolutions for {n_input} input blocks.")
    config = _config(family, int(conv_in.shape[1]), block_out, lpb, depths1, mid_depth,
                     int(to_k.shape[1]) if to_k is not None else None,
                     _first(sd, r"\.proj_in\.weight$"), cond_channels, cond_out,
                     int(sd["label_emb.0.0.weight"].shape[1]) if has_label else None, time_dim)
    time_embed = get("time_embed.0.weight")
    if int(time_embed.shape[1]) != block_out[0] or int(time_embed.shape[0]) != 4 * block_out[0]:
        raise UserError("Unsupported ControlNet: its timestep embedding width is not 4x its base channel count.")
    return ControlNetInfo(family=family, config=config, layout="ldm", prefix=prefix)


def _detect_diffusers(sd: dict, time_dim: int | None) -> ControlNetInfo:
    get = lambda k: _require(sd, k, "")  # noqa: E731
    conv_in = get("conv_in.weight")
    n_levels = _count(sd, r"down_blocks\.(\d+)\.")
    lpb = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    block_out = [int(get(f"down_blocks.{i}.resnets.0.conv2.weight").shape[0]) for i in range(n_levels)]
    depths = [_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(n_levels)]
    mid_depth = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    has_add = "add_embedding.linear_1.weight" in sd
    family = _family(sd, has_add)
    to_k = _first(sd, r"\.transformer_blocks\.0\.attn2\.to_k\.weight$")
    n_blocks = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    hint_keys = (["controlnet_cond_embedding.conv_in.weight"] +
                 [f"controlnet_cond_embedding.blocks.{i}.weight" for i in range(n_blocks)] +
                 ["controlnet_cond_embedding.conv_out.weight"])
    for k in hint_keys:
        get(k)
    cond_channels, cond_out = _hint_channels(sd, hint_keys)
    config = _config(family, int(conv_in.shape[1]), block_out, lpb, depths, mid_depth,
                     int(to_k.shape[1]) if to_k is not None else None, _first(sd, r"\.proj_in\.weight$"),
                     cond_channels, cond_out, int(sd["add_embedding.linear_1.weight"].shape[1]) if has_add else None, time_dim)
    return ControlNetInfo(family=family, config=config, layout="diffusers")


def _config(family, in_channels, block_out, lpb, depths, mid_depth, cross_dim, proj_in, cond_channels, cond_out,
            adm_in, time_dim) -> dict:
    if cross_dim is None or proj_in is None or mid_depth == 0:
        raise UserError("Unsupported ControlNet: no cross-attention found in its middle block.")
    for c in block_out:
        if c % GROUPS:
            raise UserError(f"Unsupported ControlNet: {c} channels is not a multiple of {GROUPS}.")
    config = {
        "in_channels": in_channels,
        "conditioning_channels": cond_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "block_out_channels": block_out,
        "layers_per_block": lpb,
        "cross_attention_dim": cross_dim,
        "transformer_layers_per_block": _transformer_layers(depths, mid_depth),
        "attention_head_dim": _heads(family, block_out),
        "use_linear_projection": proj_in.ndim == 2,
        "norm_num_groups": GROUPS,
        "conditioning_embedding_out_channels": tuple(cond_out),
    }
    if adm_in is not None:
        if time_dim is None:
            time_dim = SDXL_TIME_EMBED_DIM if adm_in == 2816 else None
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                       "projection_class_embeddings_input_dim": adm_in})
    return config


# -- FLUX.1 ControlNets ---------------------------------------------------------------------------
FLUX_INSTANTX_MARKERS = ("controlnet_x_embedder.weight", "controlnet_blocks.0.weight")
FLUX_XLABS_MARKERS = ("controlnet_blocks.0.weight", "pos_embed_input.weight", "double_blocks.0.img_attn.qkv.weight")


def is_flux_controlnet(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in FLUX_INSTANTX_MARKERS) or all(k in keys for k in FLUX_XLABS_MARKERS)


def _flux_blocks(keys, prefix: str) -> int:
    return _count(keys, re.escape(prefix) + r"(\d+)\.")


def _detect_flux(sd: dict) -> ControlNetInfo:
    """A FLUX ControlNet's `FluxControlNetModel` kwargs (less the rotary axes) from its shapes."""
    get = lambda k: _require(sd, k, "")  # noqa: E731
    if "controlnet_x_embedder.weight" in sd:  # InstantX / Shakker-Labs (diffusers layout)
        layout = "diffusers"
        inner, in_channels = get("x_embedder.weight").shape
        head = _first(sd, r"^(single_)?transformer_blocks\.0\.attn\.norm_q\.weight$")
        if head is None:
            raise UserError("The FLUX ControlNet has no transformer blocks (attn.norm_q); it is incomplete.")
        layers = _flux_blocks(sd, "transformer_blocks.")
        single = _flux_blocks(sd, "single_transformer_blocks.")
        joint = get("context_embedder.weight").shape[1]
        pooled = get("time_text_embed.text_embedder.linear_1.weight").shape[1]
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
        num_mode = int(sd["controlnet_mode_embedder.weight"].shape[0]) if "controlnet_mode_embedder.weight" in sd else None
        hint = "input_hint_block.conv_out.weight" in sd  # XLabs saved by diffusers
        n_control, n_single = _flux_blocks(sd, "controlnet_blocks."), _flux_blocks(sd, "controlnet_single_blocks.")
    else:  # XLabs (BFL names)
        layout = "xlabs"
        inner, in_channels = get("img_in.weight").shape
        head = get("double_blocks.0.img_attn.norm.query_norm.scale")
        layers, single = _flux_blocks(sd, "double_blocks."), 0
        joint = get("txt_in.weight").shape[1]
        pooled = get("vector_in.in_layer.weight").shape[1]
        guidance = "guidance_in.in_layer.weight" in sd
        num_mode, hint = None, True
        n_control, n_single = _flux_blocks(sd, "controlnet_blocks."), 0
        convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
        if convs != list(range(0, 16, 2)):
            raise UserError(f"Unsupported XLabs FLUX ControlNet: its hint encoder has convolutions {convs}, "
                            "expected x-flux's eight (input_hint_block.0, 2, ..., 14).")
    head_dim = int(head.shape[0])
    if int(inner) % head_dim:
        raise UserError(f"The FLUX ControlNet's width {inner} is not a multiple of its head size {head_dim}.")
    if n_control != layers or n_single != single:
        raise UserError(f"The FLUX ControlNet has {n_control}/{n_single} output projections for {layers}/{single} "
                        "blocks; the file is incomplete or of an unsupported layout.")
    config = {
        "patch_size": 2 if hint else 1,
        "in_channels": int(in_channels),
        "num_layers": layers,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": int(inner) // head_dim,
        "joint_attention_dim": int(joint),
        "pooled_projection_dim": int(pooled),
        "guidance_embeds": guidance,
        "num_mode": num_mode,
        "conditioning_embedding_channels": 16 if hint else None,
    }
    return ControlNetInfo(family="flux", config=config, layout=layout)


def _require(sd: dict, key: str, prefix: str):
    try:
        return sd[key]
    except KeyError:
        raise UserError(f"The ControlNet file is missing {prefix}{key}; it is incomplete or of an unsupported layout.") from None
