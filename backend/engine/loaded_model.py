"""A loaded checkpoint and what the backend keeps about it, in one typed object.

The model cache holds one `LoadedModel` per checkpoint file. It owns the checkpoint's modules
(`model`, a `model_loader.SDModel`) and the state that the device policy, the VAE switcher, the
LoRA code and the ControlNet runtime keep for them: the dtypes it was loaded in, where the policy
placed it and the offloading installed for that (streamer and hooks), a forced smaller residency
after an out-of-memory error, a VAE upcast to float32 after NaNs, `--compile`'s eager forward, the
chosen VAE file with the checkpoint's own VAE weights, the LoRA patches in its weights (with the
originals to restore them), the hypernetworks hooked into its UNet, and the companion models placed beside its
UNet (loaded ControlNets).

It is data only: `devices.policy.DevicePolicy` places and releases it, `worker.VaeSwitcher`
changes its VAE, `networks.lora_apply.NetworkPatcher` patches its weights, and the pipelines
receive it in `JobContext.loaded`. Nothing is stored on the torch modules themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backend.engine.networks.hypernetworks import HypernetworkHooks


@dataclass(eq=False)
class VaeChoice:
    """Which VAE the checkpoint runs with: a VAE file, or (None) its own."""

    path: str | None = None
    # The checkpoint's own VAE weights (a CPU copy), taken before a VAE file first replaced them.
    own_state: dict[str, torch.Tensor] | None = None


@dataclass(eq=False)
class LoraPatches:
    """The LoRAs in the checkpoint's weights, as `NetworkPatcher` needs them to undo or switch them."""

    # id(parameter) -> (module, attribute, original value on the CPU), for every weight a LoRA changed.
    backup: dict[int, tuple[torch.nn.Module, str, torch.Tensor]] = field(default_factory=dict)
    signature: tuple = ()  # (placement, the networks' signatures) of what is applied; () = nothing
    reports: list = field(default_factory=list)  # lora_apply.ApplyReport per network of `signature`
    targets: dict | None = None  # lora_apply.target_table of the model, built on first use
    # Forward-hook handles of LoRAs added at compute time (on quantized weights, which are never changed).
    hooks: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.backup) or bool(self.hooks)


@dataclass(eq=False)
class Companion:
    """A model that runs beside the checkpoint's UNet (a ControlNet), placed by the same policy."""

    module: torch.nn.Module
    placed: tuple  # (device, residency, id of the owner's streamer) it was placed for
    hooks: list = field(default_factory=list)  # the owner streamer's forward pre-hooks on it


@dataclass(eq=False)
class LoadedModel:
    """One checkpoint in memory: its modules and everything the backend decided about them."""

    model: Any  # backend.engine.model_loader.SDModel: unet, vae, text_encoders, family, spec, ...
    load_dtypes: tuple | None = None  # (UNet, VAE, text encoder) dtypes it was read in; None: as found
    # -- placement (devices.policy) -----------------------------------------------------------------
    placed: tuple | None = None  # what it is placed for (device, plan, dtypes, attention, ...); None: not placed
    plan: Any = None  # devices.policy.Plan in force; None while unplaced
    forced_plan: Any = None  # a smaller Plan chosen after an out-of-memory error (overrides the policy's)
    streamer: Any = None  # devices.streaming.WeightStreamer of an offloaded placement (shared with companions)
    place_hooks: list = field(default_factory=list)  # the streamer's forward pre-hooks on the model's parts
    # text encoders placed to compute off the device ({"t5xxl": cpu}: T5-XXL kept in RAM), see policy.encoder_devices
    encoder_devices: dict = field(default_factory=dict)
    vae_upcast: bool = False  # the VAE runs in float32 for good (it produced NaNs in half precision)
    compiled_for: str | None = None  # device type the UNet's forward is compiled for (--compile)
    eager_forward: Callable | None = None  # the UNet's forward before compilation
    # -- what runs with it ----------------------------------------------------------------------------
    vae: VaeChoice = field(default_factory=VaeChoice)
    lora: LoraPatches = field(default_factory=LoraPatches)
    hypernetworks: HypernetworkHooks = field(default_factory=HypernetworkHooks)  # <hypernet:...> hooks on its UNet
    companions: dict[int, Companion] = field(default_factory=dict)  # id(module) -> Companion

    @property
    def family(self) -> str:
        return getattr(self.model, "family", "")

    def companion(self, module: torch.nn.Module) -> Companion | None:
        return self.companions.get(id(module))
