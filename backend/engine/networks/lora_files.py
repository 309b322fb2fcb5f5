"""Reading LoRA / LyCORIS files: key layouts, module types, and each module's weight update.

A file is a flat dict of tensors. Every key names a target module and one of its parts:

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight          kohya, diffusers-style names
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha        kohya, LDM/SGM-style names (SDXL)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight     kohya text encoder (lora_te1_/lora_te2_: SDXL)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   diffusers / PEFT
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight         (text_encoder_2.: SDXL)
    unet.down_blocks.0....attn1.processor.to_q_lora.down.weight             old diffusers attention processors

`read_network_file` groups the tensors per module (`ModuleWeights`, keyed by part "unet" / "te1" / "te2"
and the module name with "." written as "_", which is how kohya writes them), with the part names made
uniform (`lora_A.weight` -> `lora_down.weight`, ...). `compute_update` turns one module into the
change of its weight (and bias), in float32, scaled by `alpha / rank` as A1111 does but not yet
by the user's multiplier. Supported module types:

    lora   lora_down/lora_up (+ lora_mid: LoCon's CP/Tucker form); conv kernels (LoCon)
    loha   hada_w1_a/b, hada_w2_a/b (+ hada_t1/t2)                delta = (w1a @ w1b) * (w2a @ w2b)
    lokr   lokr_w1 or lokr_w1_a/b, lokr_w2 or lokr_w2_a/b (+ lokr_t2)   delta = kron(w1, w2)
    full   diff (+ diff_b)                                        delta = diff
    norm   w_norm, b_norm (GroupNorm / LayerNorm)                 delta = w_norm, bias delta = b_norm
    ia3    weight (+ on_input)                                    delta = W * w
and DoRA's `dora_scale` on top of lora/loha/lokr. Nothing here knows about a loaded model.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.core.errors import UserError
from backend.core.tensor_headers import read_safetensors_metadata
from backend.engine.networks.flow_targets import flow_family
from backend.engine.state_dict_io import read_state_dict
from backend.networks.registry import detect_family


# kohya / LyCORIS: the module name has no "."; the part follows the first ".".
# FLUX/SD3 files: lora_te3_ is T5-XXL (kohya's sd-scripts); lora_transformer_ carries diffusers names (FLUX);
# lycoris_ is LyCORIS' own prefix for the denoiser (its names as the model's modules are named).
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                   ("lora_te_", "te1"), ("lora_transformer_", "unet"), ("lycoris_", "unet"))
# diffusers / PEFT: dotted module names under one of these prefixes ("transformer.": FLUX/SD3 in diffusers'
# names; "diffusion_model.": the BFL/SAI names as ComfyUI saves PEFT-style FLUX LoRAs).
_DOTTED_PREFIXES = (("unet.", "unet"), ("text_encoder_3.", "te3"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
                    ("base_model.model.", "unet"), ("transformer.", "unet"), ("diffusion_model.", "unet"))
# XLabs' FLUX LoRAs: attention processor layers of the BFL blocks (lora1 = image stream, lora2 = text stream),
# without a prefix (or "diffusion_model."). Written here as the BFL module they add to; the single blocks'
# `qkv_lora` covers the attention part of `linear1` only, named `single_blocks_N_attn_qkv` (see flow_targets).
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)\.(down|up)\.weight$")
_XLABS_TARGETS = {("double", "qkv", "1"): "img_attn_qkv", ("double", "proj", "1"): "img_attn_proj",
                  ("double", "qkv", "2"): "txt_attn_qkv", ("double", "proj", "2"): "txt_attn_proj",
                  ("single", "qkv", ""): "attn_qkv", ("single", "proj", ""): "linear2"}
# Part names as written by diffusers/PEFT -> kohya's.
_DOTTED_PARTS = (
    ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"),
    ("lora.down.weight", "lora_down.weight"), ("lora.up.weight", "lora_up.weight"),
    ("lora_linear_layer.down.weight", "lora_down.weight"), ("lora_linear_layer.up.weight", "lora_up.weight"),
    ("lora_down.weight", "lora_down.weight"), ("lora_up.weight", "lora_up.weight"), ("lora_mid.weight", "lora_mid.weight"),
)
_LYCORIS_PARTS = ("alpha", "scale", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b",
                  "w_norm", "b_norm", "on_input")
_PEFT_ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.[^.]+\.weight$")  # lora_A.<adapter name>.weight
_ATTN_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


class ShapeMismatch(ValueError):
    """A module's update does not fit the weight it was matched to."""


@dataclass
class ModuleWeights:
    """One target module's tensors in a file."""

    key: str  # the module's name in the file (for messages)
    part: str  # unet | te1 | te2
    name: str  # module name within the part, "." written as "_"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        t = self.tensors
        if "lora_up.weight" in t and "lora_down.weight" in t:
            return "lora"
        if all(k in t for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return "loha"
        if ("lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)) and \
                ("lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)):
            return "lokr"
        if "diff" in t:
            return "full"
        if "w_norm" in t:
            return "norm"
        if "weight" in t:
            return "ia3"
        return "unknown"

    @property
    def is_text_encoder(self) -> bool:
        return self.part != "unet"


@dataclass
class NetworkFile:
    """A LoRA/LyCORIS file, read: its modules, metadata and what base model it says it was made for."""

    path: Path
    name: str
    modules: dict[tuple[str, str], ModuleWeights]
    metadata: dict[str, str]
    family: str | None  # sd1 | sd2 | sdxl | flux | sd3 when the file says so (metadata, SDXL's two text
    # encoders, FLUX's / SD3's module names)
    unknown_keys: list[str]
    stamp: tuple  # (size, mtime): a changed file is read again

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.kind] = counts.get(m.kind, 0) + 1
        return counts


def file_stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """A tensor name -> (part, module name with "_", part name, the module as the file names it),
    or None when it names no module we know."""
    m = _XLABS.match(key)
    if m:
        kind, index, layer, stream, side = m.groups()
        target = _XLABS_TARGETS.get((kind, layer, stream))
        if target is None:
            return None
        return ("unet", f"{kind}_blocks_{index}_{target}", "lora_down.weight" if side == "down" else "lora_up.weight",
                key.rsplit(".", 2)[0])
    for prefix, part in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            module, dot, suffix = key[len(prefix):].partition(".")
            if not dot or not module:
                return None
            return part, _strip_compvis(module, part), suffix, prefix + module
    for prefix, part in _DOTTED_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            found = _split_dotted(rest)
            if found is None:
                return None
            module, suffix = found
            return part, _strip_compvis(module.replace(".", "_"), part), suffix, prefix + module
    return None


def _split_dotted(rest: str) -> tuple[str, str] | None:
    m = _ATTN_PROCESSOR.match(rest)
    if m:
        target = m.group(2) + (".0" if m.group(2) == "to_out" else "")
        return f"{m.group(1)}.{target}", "lora_down.weight" if m.group(3) == "down" else "lora_up.weight"
    m = _PEFT_ADAPTER.match(rest)
    if m and not rest.endswith((".lora_A.weight", ".lora_B.weight")):
        return m.group(1), "lora_down.weight" if m.group(2) == "A" else "lora_up.weight"
    for written, suffix in _DOTTED_PARTS:
        if rest.endswith("." + written):
            return rest[: -len(written) - 1], suffix
    for suffix in _LYCORIS_PARTS + ("weight",):
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return None


def _strip_compvis(name: str, part: str) -> str:
    """A1111's own compvis names (`diffusion_model_...`, `transformer_text_model_...`) -> ours."""
    if part == "unet" and name.startswith("diffusion_model_"):
        return name[len("diffusion_model_"):]
    if part != "unet":
        if name.startswith("transformer_text_model_"):
            name = name[len("transformer_"):]
        if not name.startswith("text_model_"):
            name = "text_model_" + name
    return name


def read_network_file(path: Path, name: str | None = None) -> NetworkFile:
    """Read a LoRA/LyCORIS file (`.safetensors`, or `.pt`/`.ckpt` loaded without unpickling code).

    A damaged or unreadable file raises `UserError` naming it.
    """
    path = Path(path)
    name = name or path.stem
    tensors = read_state_dict(path)
    metadata = {}
    if path.suffix.lower() == ".safetensors":
        metadata = read_safetensors_metadata(path)
    modules: dict[tuple[str, str], ModuleWeights] = {}
    unknown = []
    for key, value in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        part, module, suffix, label = split
        entry = modules.get((part, module))
        if entry is None:
            entry = modules[(part, module)] = ModuleWeights(key=label, part=part, name=module)
        entry.tensors[suffix] = value
    if not modules:
        raise UserError(f"{path.name} is not a LoRA file Easel recognizes: none of its {len(tensors)} tensors "
                        f"names a LoRA/LyCORIS module (e.g. {', '.join(sorted(tensors)[:3])}).")
    family = detect_family(metadata, set())  # what its metadata says
    if family is None:  # what its module names say: FLUX/SD3 layouts (then te2 is CLIP-G or T5, not SDXL's)
        flow = flow_family(m.name for m in modules.values() if m.part == "unet")
        family = flow if flow in ("flux", "sd3") else None
        if flow is None:
            family = detect_family(metadata, {m.part for m in modules.values()})
    return NetworkFile(path=path, name=name, modules=modules, metadata=metadata, family=family,
                       unknown_keys=unknown, stamp=file_stamp(path))


# -- the math ---------------------------------------------------------------------------------------
def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _rebuild_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP/Tucker form: core t [ra, rb, kh, kw], wa [ra, out], wb [rb, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))


def _scale(mw: ModuleWeights, dim: int | None) -> float:
    t = mw.tensors
    if "scale" in t:
        return float(t["scale"].item())
    if dim is not None and "alpha" in t:
        return float(t["alpha"].item()) / dim
    return 1.0


def fit_to(updown: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reshape an update to the weight's shape; a 4-channel conv update on a 9-channel (inpainting) input is zero-padded."""
    shape = tuple(shape)
    if updown.numel() == math.prod(shape):
        return updown.reshape(shape)
    if len(shape) == 4:
        per_channel = shape[0] * shape[2] * shape[3]
        if per_channel and updown.numel() % per_channel == 0:
            channels = updown.numel() // per_channel
            if channels < shape[1]:
                padded = updown.reshape(shape[0], channels, shape[2], shape[3])
                return F.pad(padded, (0, 0, 0, 0, 0, shape[1] - channels))
    raise ShapeMismatch(f"update of shape {tuple(updown.shape)} does not fit a weight of shape {shape}")


def _lora_factors(mw: ModuleWeights, device, dyn_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain LoRA module's (up [out, r], down [r, in*kh*kw]) in float32, alpha/rank folded into `down`
    (a new tensor), the first `dyn_dim` ranks only when that is set."""
    t = mw.tensors
    up, down = _f32(t["lora_up.weight"], device), _f32(t["lora_down.weight"], device)
    scale = _scale(mw, down.shape[0])
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if dyn_dim is not None and dyn_dim > 0:
        up2, down2 = up2[:, :dyn_dim], down2[:dyn_dim]
    return up2, down2 * scale


def low_rank_update(mw: ModuleWeights, weight: torch.Tensor, *,
                    dyn_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a plain LoRA module (lora_up/lora_down, no lora_mid, no DoRA) that fits `weight`: (up, down),
    float32 on the weight's device, with `up @ down` (reshaped) = the update `compute_update` gives.

    The caller can add the product straight into the weight (`addmm_`) without making the full-size
    update first. `down` is a new tensor the caller may scale in place. None when the module is of
    another kind or does not fit: `compute_update` then gives the update, or the reason.
    """
    return low_rank_factors(mw, weight.shape, weight.device, dyn_dim=dyn_dim)


def low_rank_factors(mw: ModuleWeights, shape, device, *,
                     dyn_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`low_rank_update` for a weight of `shape` on `device` that need not exist as one tensor (a fused FLUX/SD3
    layer held by several modules, a quantized weight)."""
    t = mw.tensors
    if mw.kind != "lora" or "lora_mid.weight" in t or "dora_scale" in t:
        return None
    up2, down2 = _lora_factors(mw, device, dyn_dim)
    shape = tuple(shape)
    if up2.shape[1] != down2.shape[0] or up2.shape[0] != shape[0] or \
            up2.shape[0] * down2.shape[1] != math.prod(shape):
        return None
    return up2, down2


def compute_update(mw: ModuleWeights, weight: torch.Tensor, *, dyn_dim: int | None = None,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) change one module makes, scaled by its alpha/rank, without the user's multiplier.

    `weight` is the target's original weight (any dtype/device); the results are float32 on its device,
    the weight change in its shape, and new tensors (never the file's own), so the caller may change
    them in place. Raises `ShapeMismatch` when the module does not fit, `ValueError` for a module type
    Easel does not know.
    """
    device = weight.device
    shape = weight.shape
    t = {k: v for k, v in mw.tensors.items()}
    kind = mw.kind
    ex_bias = None
    dim = None
    scale = None  # alpha / rank, once applied
    try:
        if kind == "lora":
            up, down = _f32(t["lora_up.weight"], device), _f32(t["lora_down.weight"], device)
            dim = down.shape[0]
            if "lora_mid.weight" in t:
                up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
                mid = _f32(t["lora_mid.weight"], device)
                updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up2, down2)
            else:
                up2, down2 = _lora_factors(mw, device, dyn_dim)
                scale = 1.0  # already in down2
                updown = up2 @ down2
        elif kind == "loha":
            w1a, w1b = _f32(t["hada_w1_a"], device), _f32(t["hada_w1_b"], device)
            w2a, w2b = _f32(t["hada_w2_a"], device), _f32(t["hada_w2_b"], device)
            dim = w1b.shape[0]
            if "hada_t1" in t:
                w1 = _rebuild_cp(_f32(t["hada_t1"], device), w1a, w1b)
            else:
                w1 = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)
            if "hada_t2" in t:
                w2 = _rebuild_cp(_f32(t["hada_t2"], device), w2a, w2b)
            else:
                w2 = w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)
            updown = fit_to(w1, shape) * fit_to(w2, shape)
        elif kind == "lokr":
            if "lokr_w1" in t:
                w1 = _f32(t["lokr_w1"], device)
            else:
                w1b = _f32(t["lokr_w1_b"], device)
                dim = w1b.shape[0]
                w1 = _f32(t["lokr_w1_a"], device) @ w1b
            if "lokr_w2" in t:
                w2 = _f32(t["lokr_w2"], device)
            else:
                w2a, w2b = _f32(t["lokr_w2_a"], device), _f32(t["lokr_w2_b"], device)
                dim = w2b.shape[0] if dim is None else dim
                if "lokr_t2" in t:
                    w2 = _rebuild_cp(_f32(t["lokr_t2"], device), w2a, w2b)
                else:
                    w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
            if w2.ndim == 4:
                w1 = w1.reshape(w1.shape[0], w1.shape[1], 1, 1)
            updown = torch.kron(w1, w2.contiguous())
        elif kind in ("full", "norm"):  # the file's tensors as they are: copies, so they stay untouched
            weight_key, bias_key = ("diff", "diff_b") if kind == "full" else ("w_norm", "b_norm")
            updown = t[weight_key].to(device=device, dtype=torch.float32, copy=True)
            if bias_key in t:
                ex_bias = t[bias_key].to(device=device, dtype=torch.float32, copy=True)
        elif kind == "ia3":
            w = _f32(t["weight"], device).flatten()
            on_input = "on_input" in t and bool(t["on_input"].flatten()[0].item())
            orig = weight.detach().to(torch.float32)
            view = [1] * orig.ndim
            axis = 1 if on_input else 0
            if w.numel() != orig.shape[axis]:
                raise ShapeMismatch(f"IA3 vector of {w.numel()} values for a weight of shape {tuple(shape)}")
            view[axis] = -1
            updown = orig * w.reshape(view)
        else:
            raise ValueError(f"module type with parts {', '.join(sorted(t))} is not supported")
        updown = fit_to(updown, shape)
        if scale is None and (scale := _scale(mw, dim)) != 1.0:
            updown.mul_(scale)  # in place: a full-size update is not allocated twice
    except RuntimeError as exc:  # einsum / matmul with parts that do not belong together
        raise ShapeMismatch(str(exc).splitlines()[0]) from exc
    if ex_bias is not None:
        if bias is None or ex_bias.numel() != bias.numel():
            raise ShapeMismatch(f"bias update of {ex_bias.numel()} values does not fit the module")
        ex_bias = ex_bias.reshape(bias.shape)
    if "dora_scale" in t and kind in ("lora", "loha", "lokr"):
        updown = _dora(updown, weight.detach().to(device=device, dtype=torch.float32), _f32(t["dora_scale"], device))
    return updown, ex_bias


def _dora(updown: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA: rescale the merged weight to the trained magnitudes (per input channel, or per output
    channel when `dora_scale` is shaped [out, 1, ...]); the update is the difference to the original."""
    merged = orig + updown
    if dora_scale.ndim >= 2 and dora_scale.shape[0] != 1 and dora_scale.shape[0] == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (merged.ndim - 1)))
    else:
        dims = [d for d in range(merged.ndim) if d != 1]
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) if dims else merged.abs()
    scale = dora_scale.reshape(norm.shape) if dora_scale.numel() == norm.numel() else dora_scale
    return merged * (scale / norm) - orig
