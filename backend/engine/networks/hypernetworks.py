"""A1111 hypernetworks (`.pt` files in models/hypernetworks) and `<hypernet:name:multiplier>`, in the backend.

A hypernetwork file (as A1111's `Hypernetwork.save` writes it) is a pickled dict:

    {320: (k_state, v_state), 640: (...), 768: (...), 1280: (...),       one pair of small MLPs per width
     "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
     "activate_output": False, "use_dropout": ..., "name": ..., "step": ..., "sd_checkpoint": ...}

Each MLP's state dict is that of a `torch.nn.Sequential` named `linear` (`linear.0.weight`, `linear.2.bias`,
...): per step of `layer_structure`, a Linear, the activation (not after the last Linear unless
`activate_output`), a LayerNorm when `is_layer_norm`, and dropout (nothing at inference). Old files name the
two layers `linear1`/`linear2`.

At inference a hypernetwork changes what the attention layers' key and value projections read: in every
attention layer whose context (the text for cross-attention, the picture's own features for self-attention)
has a width the file has a pair for, `to_k` reads `c + k_mlp(c) * multiplier` and `to_v` reads
`c + v_mlp(c) * multiplier`; several hypernetworks chain, in the prompt's order. The MLPs run in float32
(as A1111's `cond_cast_float`). Here this is a forward pre-hook on each `to_k`/`to_v` Linear of the UNet,
installed by `HypernetworkHooks.apply` for the job's tags and removed when a later job has none: the
checkpoint's weights are never touched.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.engine.networks.lora_files import file_stamp
from backend.engine.state_dict_io import load_pickle

# A1111's names for the activations (its dict, plus every class of torch.nn.modules.activation lowercased).
_NAMED_ACTIVATIONS = {"linear": None, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
                      "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
_LAYER_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")


def _activation(name) -> torch.nn.Module | None:
    if name is None:
        return None
    key = str(name).lower()
    if key in _NAMED_ACTIVATIONS:
        cls = _NAMED_ACTIVATIONS[key]
        return cls() if cls is not None else None
    import torch.nn.modules.activation as acts
    for attr in dir(acts):
        cls = getattr(acts, attr)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and attr.lower() == key:
            try:
                return cls()
            except TypeError:  # needs arguments A1111 never gives either
                break
    raise UserError(f"the hypernetwork uses an unsupported activation function: {name}")


class HypernetworkMLP(torch.nn.Module):
    """One of a hypernetwork's small networks: `x + layers(x) * multiplier` (the multiplier is the caller's)."""

    def __init__(self, state: dict, activation_func, activate_output: bool):
        super().__init__()
        state = {_OLD_KEYS.get(k, k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        indexed: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            m = _LAYER_KEY.match(key)
            if m is None:
                raise UserError(f"unexpected tensor {key!r} in a hypernetwork layer")
            indexed.setdefault(int(m.group(1)), {})[m.group(2)] = value.detach().to(torch.float32)
        linear_at = [i for i in sorted(indexed) if indexed[i].get("weight") is not None and indexed[i]["weight"].ndim == 2]
        if not linear_at:
            raise UserError("a hypernetwork layer has no linear weights")
        layers: list[torch.nn.Module] = []
        for i in sorted(indexed):
            weight, bias = indexed[i].get("weight"), indexed[i].get("bias")
            if weight is None:
                raise UserError(f"hypernetwork layer linear.{i} has no weight")
            if weight.ndim == 2:
                lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                lin.weight.data.copy_(weight)
                if bias is not None:
                    lin.bias.data.copy_(bias)
                layers.append(lin)
                if i != linear_at[-1] or activate_output:
                    act = _activation(activation_func)
                    if act is not None:
                        layers.append(act)
            elif weight.ndim == 1:  # LayerNorm (follows its Linear's activation, as A1111 builds it)
                norm = torch.nn.LayerNorm(weight.shape[0])
                norm.weight.data.copy_(weight)
                if bias is not None:
                    norm.bias.data.copy_(bias)
                layers.append(norm)
            else:
                raise UserError(f"hypernetwork layer linear.{i} has a {weight.ndim}-dimensional weight")
        self.layers = torch.nn.Sequential(*layers)
        first, last = indexed[linear_at[0]]["weight"], indexed[linear_at[-1]]["weight"]
        if first.shape[1] != last.shape[0]:
            raise UserError(f"a hypernetwork layer maps width {first.shape[1]} to {last.shape[0]}")
        self.width = int(first.shape[1])
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the change only; the hook adds x
        return self.layers(x)


@dataclass
class HypernetworkFile:
    """A hypernetwork file read: {width: (k MLP, v MLP)}."""

    name: str
    path: Path
    stamp: tuple
    layers: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]]
    meta: dict = field(default_factory=dict)


def read_hypernetwork(path: Path, name: str) -> HypernetworkFile:
    """Read an A1111 hypernetwork `.pt` (no code is unpickled); `UserError` for a file that is not one."""
    path = Path(path)
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} is not a hypernetwork (it holds {type(obj).__name__}).")
    activation_func = obj.get("activation_func")
    activate_output = bool(obj.get("activate_output", True))  # A1111's default when the key is missing
    layers: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]] = {}
    for width, pair in obj.items():
        if not isinstance(width, int):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(p, dict) for p in pair):
            raise UserError(f"{path.name} is not a hypernetwork: its entry for width {width} is not a (k, v) pair.")
        try:
            k, v = (HypernetworkMLP(p, activation_func, activate_output) for p in pair)
        except UserError as exc:
            raise UserError(f"{path.name}: {exc.message}") from exc
        if k.width != width or v.width != width:
            raise UserError(f"{path.name}: its layers for width {width} have width {k.width}.")
        layers[width] = (k, v)
    if not layers:
        raise UserError(f"{path.name} is not a hypernetwork: it has no layers (is it a LoRA or an embedding?).")
    meta = {k: obj[k] for k in ("name", "step", "layer_structure", "activation_func", "is_layer_norm",
                                 "activate_output", "sd_checkpoint_name") if k in obj}
    return HypernetworkFile(name=name, path=path, stamp=file_stamp(path), layers=layers, meta=meta)


@dataclass
class ActiveHypernetwork:
    file: HypernetworkFile
    multiplier: float


class _Placed:
    """Copies of the MLPs on the devices the UNet runs on (the files' own stay on the CPU), shared by the hooks."""

    def __init__(self):
        self.copies: dict[tuple, HypernetworkMLP] = {}

    def on(self, mlp: HypernetworkMLP, device: torch.device) -> HypernetworkMLP:
        if device.type == "cpu":
            return mlp
        key = (id(mlp), device.type, device.index)
        if key not in self.copies:
            self.copies[key] = copy.deepcopy(mlp).to(device)
        return self.copies[key]


class _ProjectionHook:
    """Forward pre-hook of one `to_k` or `to_v`: adds each active hypernetwork's change to the context it reads."""

    def __init__(self, steps: list[tuple[HypernetworkMLP, float]], placed: _Placed):
        self.steps = steps
        self.placed = placed

    def __call__(self, module, args):
        context = args[0]
        x = context.to(torch.float32)
        for mlp, multiplier in self.steps:
            x = x + self.placed.on(mlp, context.device)(x) * multiplier
        return (x.to(context.dtype),) + tuple(args[1:])


def _attention_layers(unet: torch.nn.Module):
    """The UNet's attention layers that have separate key and value projections."""
    for module in unet.modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if isinstance(to_k, torch.nn.Linear) and isinstance(to_v, torch.nn.Linear):
            yield module, to_k, to_v


@dataclass(eq=False)
class HypernetworkHooks:
    """The hypernetworks hooked into one loaded checkpoint's UNet (`LoadedModel.hypernetworks`)."""

    handles: list = field(default_factory=list)
    signature: tuple = ()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.signature = [], ()

    def apply(self, unet: torch.nn.Module, networks: list[ActiveHypernetwork]) -> list[str]:
        """Hook `networks` (in order) into `unet`, replacing any earlier ones; [] removes them.
        Returns the names of the networks that match no attention layer of this model (not applied)."""
        signature = tuple((n.file.path, n.file.stamp, n.multiplier) for n in networks)
        if signature == self.signature:
            return []
        self.remove()
        used, placed = set(), _Placed()
        for _, to_k, to_v in _attention_layers(unet):
            width = to_k.in_features
            k_steps = [(n.file.layers[width][0], n.multiplier) for n in networks if width in n.file.layers]
            v_steps = [(n.file.layers[width][1], n.multiplier) for n in networks if width in n.file.layers]
            if not k_steps:
                continue
            used.update(n.file.name for n in networks if width in n.file.layers)
            self.handles.append(to_k.register_forward_pre_hook(_ProjectionHook(k_steps, placed)))
            self.handles.append(to_v.register_forward_pre_hook(_ProjectionHook(v_steps, placed)))
        self.signature = signature
        return [n.file.name for n in networks if n.file.name not in used]
