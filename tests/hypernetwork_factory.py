"""Tiny A1111 hypernetwork files (`.pt`, as A1111's `Hypernetwork.save` writes them) for the tiny fixture models.

Plain module imported by tests (not a test file).
"""
from __future__ import annotations

from pathlib import Path

import torch


def hypernetwork_dict(widths: list[int], *, seed: int = 0, layer_structure=(1, 2, 1), activation="relu",
                      layer_norm: bool = False, activate_output: bool = False, scale: float = 0.5) -> dict:
    """A1111's saved dict: {width: (k state, v state)} with `linear.N` Sequential indices as A1111 builds them
    (Linear, activation except after the last Linear unless `activate_output`, LayerNorm when `layer_norm`)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    for width in widths:
        pair = []
        for _ in range(2):
            state, index = {}, 0
            for i in range(len(layer_structure) - 1):
                n_in, n_out = int(width * layer_structure[i]), int(width * layer_structure[i + 1])
                state[f"linear.{index}.weight"] = torch.randn(n_out, n_in, generator=gen) * scale / n_in ** 0.5
                state[f"linear.{index}.bias"] = torch.randn(n_out, generator=gen) * 0.1
                index += 1
                if activation not in (None, "linear") and (i < len(layer_structure) - 2 or activate_output):
                    index += 1
                if layer_norm:
                    state[f"linear.{index}.weight"] = 1 + 0.1 * torch.randn(n_out, generator=gen)
                    state[f"linear.{index}.bias"] = 0.1 * torch.randn(n_out, generator=gen)
                    index += 1
            pair.append(state)
        out[width] = tuple(pair)
    out.update({"step": 1000, "name": "tiny", "layer_structure": list(layer_structure), "activation_func": activation,
                "is_layer_norm": layer_norm, "weight_initialization": "Normal", "use_dropout": False,
                "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny", "activate_output": activate_output,
                "last_layer_dropout": False})
    return out


def save_hypernetwork(path: Path, widths: list[int], **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(hypernetwork_dict(widths, **kw), path)
    return path
