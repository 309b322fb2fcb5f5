"""Tiny LoRA / LyCORIS / embedding files for the tiny fixture models, in the real key layouts.

Module names are written as the trainers write them (kohya `lora_unet_..._lora_down.weight`, its
LDM/SGM names for SDXL, PEFT `...lora_A.weight`, LyCORIS `hada_w1_a`, `lokr_w1`, `diff`, `w_norm`),
with random tensors shaped for the tiny architectures of `model_factory`. The tests compute the
expected weight changes from the tensors themselves.

Plain module imported by tests (not a test file).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from model_factory import build_tiny_modules

FAMILY_METADATA = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@functools.lru_cache(maxsize=None)
def weight_shapes(family: str) -> dict[tuple[str, str], tuple]:
    """{(part, diffusers/transformers module name): weight shape} of the tiny `family` model."""
    built = build_tiny_modules(family, seed=0)
    shapes = {}
    for name, p in built["unet"].named_parameters():
        if name.endswith(".weight"):
            shapes[("unet", name[: -len(".weight")])] = tuple(p.shape)
    for index, enc in enumerate(built["text_encoders"]):
        part = f"te{index + 1}"
        for name, p in enc.named_parameters():
            if name.endswith(".weight"):
                bare = name[len("text_model."):] if name.startswith("text_model.") else name
                shapes[(part, bare[: -len(".weight")])] = tuple(p.shape)
    return shapes


def _rand(gen: torch.Generator, *shape, scale: float = 0.3) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).contiguous()


def module_tensors(kind: str, shape: tuple, gen: torch.Generator, *, rank: int = 2, alpha: float | None = 1.0,
                   tucker: bool = False) -> dict[str, torch.Tensor]:
    """The parts of one module of type `kind` for a weight of `shape` (suffixes as kohya/LyCORIS write them)."""
    out_dim, in_dim = shape[0], (shape[1] if len(shape) > 1 else 1)
    kernel = tuple(shape[2:])
    t: dict[str, torch.Tensor] = {}
    if kind == "lora":
        if kernel and tucker:
            t["lora_down.weight"] = _rand(gen, rank, in_dim, 1, 1)
            t["lora_mid.weight"] = _rand(gen, rank, rank, *kernel)
            t["lora_up.weight"] = _rand(gen, out_dim, rank, 1, 1)
        elif kernel:
            t["lora_down.weight"] = _rand(gen, rank, in_dim, *kernel)
            t["lora_up.weight"] = _rand(gen, out_dim, rank, 1, 1)
        else:
            t["lora_down.weight"] = _rand(gen, rank, in_dim)
            t["lora_up.weight"] = _rand(gen, out_dim, rank)
    elif kind == "loha":
        for i in (1, 2):
            if kernel and tucker:
                t[f"hada_t{i}"] = _rand(gen, rank, rank, *kernel)
                t[f"hada_w{i}_a"] = _rand(gen, rank, out_dim)
                t[f"hada_w{i}_b"] = _rand(gen, rank, in_dim)
            else:
                t[f"hada_w{i}_a"] = _rand(gen, out_dim, rank)
                t[f"hada_w{i}_b"] = _rand(gen, rank, in_dim * math.prod(kernel))
    elif kind == "lokr":
        o1 = 2 if out_dim % 2 == 0 else 1
        i1 = 2 if in_dim % 2 == 0 else 1
        o2, i2 = out_dim // o1, in_dim // i1
        t["lokr_w1"] = _rand(gen, o1, i1)
        if kernel and tucker:
            t["lokr_t2"] = _rand(gen, rank, rank, *kernel)
            t["lokr_w2_a"] = _rand(gen, rank, o2)
            t["lokr_w2_b"] = _rand(gen, rank, i2)
        else:
            t["lokr_w2_a"] = _rand(gen, o2, rank)
            t["lokr_w2_b"] = _rand(gen, rank, i2 * math.prod(kernel))
    elif kind == "full":
        t["diff"] = _rand(gen, *shape, scale=0.05)
        t["diff_b"] = _rand(gen, out_dim, scale=0.05)
    elif kind == "norm":
        t["w_norm"] = _rand(gen, *shape, scale=0.1)
        t["b_norm"] = _rand(gen, *shape, scale=0.1)
    elif kind == "ia3":
        t["weight"] = _rand(gen, out_dim, scale=0.2)
        t["on_input"] = torch.tensor(False)
    else:
        raise ValueError(kind)
    if alpha is not None and kind in ("lora", "loha", "lokr"):
        t["alpha"] = torch.tensor(float(alpha))
    return t


def kohya_name(family: str, part: str, module: str, *, ldm: str | None = None) -> str:
    """kohya's module name: lora_unet_<name with _> (or its LDM name), lora_te_/lora_te1_/lora_te2_ + text_model_..."""
    if part == "unet":
        return "lora_unet_" + (ldm or module).replace(".", "_")
    prefix = "lora_te_" if family != "sdxl" else ("lora_te1_" if part == "te1" else "lora_te2_")
    return prefix + ("text_model." + module).replace(".", "_")


def peft_name(part: str, module: str) -> str:
    if part == "unet":
        return "unet." + module
    return ("text_encoder." if part == "te1" else "text_encoder_2.") + "text_model." + module


PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def build_file(family: str, modules: list[dict], *, seed: int = 0, naming: str = "kohya") -> dict[str, torch.Tensor]:
    """Tensors of a file with `modules`: dicts with part, module (diffusers name), kind, and optional
    ldm (the LDM name to write instead), rank, alpha, tucker, dora."""
    shapes = weight_shapes(family)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        shape = shapes[(m["part"], m["module"])]
        parts = module_tensors(m["kind"], shape, gen, rank=m.get("rank", 2), alpha=m.get("alpha", 1.0),
                               tucker=m.get("tucker", False))
        if m.get("dora"):
            parts["dora_scale"] = (1.0 + _rand(gen, 1, shape[1], *([1] * (len(shape) - 2)), scale=0.1)).contiguous()
        if naming == "peft":
            base = peft_name(m["part"], m["module"])
            for suffix, value in parts.items():
                if suffix == "alpha":
                    out[f"{base}.alpha"] = value
                else:
                    out[f"{base}.{PEFT_SUFFIX.get(suffix, suffix)}"] = value
        else:
            base = kohya_name(family, m["part"], m["module"], ldm=m.get("ldm"))
            for suffix, value in parts.items():
                out[f"{base}.{suffix}"] = value
    return out


def save_lora(path: Path, tensors: dict[str, torch.Tensor], *, family: str | None = None,
              metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        meta = dict(metadata or {})
        if family:
            meta.setdefault("ss_base_model_version", FAMILY_METADATA[family])
            meta.setdefault("ss_output_name", path.stem)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    else:
        torch.save(tensors, path)
    return path


def simple_lora(family: str, seed: int = 0, rank: int = 2, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """A kohya LoRA on a few attention projections, a conv and the text encoder: changes the picture."""
    if family == "sdxl":
        mods = [{"part": "unet", "module": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"},
                {"part": "unet", "module": "up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_out.0"},
                {"part": "unet", "module": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"},
                {"part": "te1", "module": "encoder.layers.0.self_attn.q_proj"},
                {"part": "te2", "module": "encoder.layers.1.mlp.fc1"}]
    else:
        mods = [{"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"},
                {"part": "unet", "module": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"},
                {"part": "unet", "module": "down_blocks.0.resnets.0.conv1"},
                {"part": "te1", "module": "encoder.layers.0.self_attn.q_proj"}]
    for m in mods:
        m.update(kind="lora", rank=rank, alpha=alpha)
    tensors = build_file(family, mods, seed=seed)
    # Large enough to change a tiny model's picture visibly.
    return {k: (v * 4 if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}


def save_embedding(path: Path, vectors, *, fmt: str | None = None) -> Path:
    """An embedding file: a [n, dim] tensor (A1111 .pt, safetensors emb_params, diffusers .bin) or
    {"clip_l": ..., "clip_g": ...} (SDXL safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix.lstrip(".")
    if isinstance(vectors, dict):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
    elif fmt == "pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 1500,
                    "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "tiny"}, path)
    elif fmt == "bin":
        torch.save({f"<{path.stem}>": vectors}, path)
    else:
        from safetensors.torch import save_file
        save_file({"emb_params": vectors.contiguous()}, str(path))
    return path
