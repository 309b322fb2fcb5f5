"""The device policy: where each model part lives and in which dtype.

One object, built from the flags, decides:
- the compute device (CUDA when present unless `--use-cpu all|sd`; else CPU),
- the dtype of the UNet/text encoders and of the VAE (`--no-half`, `--no-half-vae`,
  `--precision full`; float32 on the CPU),
- residency: everything resident (default), `--medvram` (text encoders, UNet and
  VAE kept in RAM, each moved to the GPU when it runs and the previous one moved
  back), `--lowvram` (the same, and inside the UNet one block at a time).

Pipelines never move weights themselves: they call `place(model)` once and create
their inputs on `policy.device`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    mode: str = "resident"  # resident | medvram | lowvram
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_args(cls, args, part: str = "sd") -> "DevicePolicy":
        use_cpu = set(getattr(args, "use_cpu", []) or [])
        if torch.cuda.is_available() and not ({"all", part} & use_cpu):
            index = getattr(args, "device_id", None)
            device = torch.device(f"cuda:{index}" if index is not None else "cuda")
        else:
            device = torch.device("cpu")
        full = args.no_half or args.precision == "full" or device.type == "cpu"
        dtype = torch.float32 if full else torch.float16
        vae_dtype = torch.float32 if (full or args.no_half_vae) else torch.float16
        mode = "resident"
        if device.type == "cuda":
            if args.lowvram:
                mode = "lowvram"
            elif args.medvram:
                mode = "medvram"
        return cls(device=device, dtype=dtype, vae_dtype=vae_dtype, mode=mode)

    @property
    def offloads(self) -> bool:
        return self.mode in ("medvram", "lowvram")

    def describe(self) -> str:
        return f"device={self.device} dtype={str(self.dtype).replace('torch.', '')} vae={str(self.vae_dtype).replace('torch.', '')} mode={self.mode}"

    def place(self, model) -> None:
        """Put a loaded `SDModel`'s parts where this policy says, installing offload hooks if needed."""
        model.unet.to(dtype=self.dtype)
        for enc in model.text_encoders:
            enc.to(dtype=self.dtype)
        model.vae.to(dtype=self.vae_dtype)
        if getattr(model, "_easel_placed", None) == (self.device, self.mode):
            return
        if not self.offloads:
            for part in self.parts(model):
                part.to(self.device)
        else:
            for part in self.parts(model):
                part.to(self.offload_device)
            swapper = _ModuleSwapper(self.device, self.offload_device)
            targets = list(model.text_encoders) + [model.vae.encoder, model.vae.decoder, model.vae.quant_conv, model.vae.post_quant_conv]
            if self.mode == "medvram":
                targets.append(model.unet)
            else:
                targets.extend(unet_blocks(model.unet))
                # small UNet parts stay on the device
                for name in ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "conv_norm_out", "conv_act", "conv_out"):
                    sub = getattr(model.unet, name, None)
                    if sub is not None:
                        sub.to(self.device)
            for module in targets:
                if module is not None:
                    module.register_forward_pre_hook(swapper.hook)
            model._easel_swapper = swapper  # shared with models that run beside the UNet (ControlNets)
        model._easel_placed = (self.device, self.mode)
        log.info("model placed: %s", self.describe())

    @staticmethod
    def parts(model) -> list[torch.nn.Module]:
        return [model.unet, model.vae, *model.text_encoders]

    def release(self, model) -> None:
        """Move a model off the accelerator (used when it leaves the GPU cache)."""
        for part in self.parts(model):
            part.to(self.offload_device)
        model._easel_placed = None

    def place_beside(self, module: torch.nn.Module, owner) -> None:
        """Place a model that runs beside `owner`'s UNet (a ControlNet) by the same policy as that UNet.

        Resident: on the device. --medvram: kept in RAM and swapped in whole by the owner's swapper,
        so it and the UNet take turns on the device. --lowvram: its big blocks are streamed one at a
        time by the same swapper, its small parts stay on the device.
        """
        module.to(dtype=self.dtype)
        swapper = getattr(owner, "_easel_swapper", None) if self.offloads else None
        placed = (self.device, self.mode, id(swapper))
        if getattr(module, "_easel_placed", None) == placed:
            return
        self._remove_hooks(module)
        if swapper is None:
            module.to(self.device)
        else:
            module.to(self.offload_device)
            targets = [module] if self.mode == "medvram" else unet_blocks(module)
            if self.mode == "lowvram":
                streamed = {id(b) for b in targets}
                for child in module.children():
                    if id(child) not in streamed and not isinstance(child, torch.nn.ModuleList):
                        child.to(self.device)
                    elif isinstance(child, torch.nn.ModuleList) and not any(id(c) in streamed for c in child):
                        child.to(self.device)
            module._easel_hooks = [t.register_forward_pre_hook(swapper.hook) for t in targets]
        module._easel_placed = placed

    def release_beside(self, module: torch.nn.Module) -> None:
        """Move a model placed by `place_beside` off the accelerator."""
        self._remove_hooks(module)
        module.to(self.offload_device)
        module._easel_placed = None

    @staticmethod
    def _remove_hooks(module: torch.nn.Module) -> None:
        for handle in getattr(module, "_easel_hooks", []):
            handle.remove()
        module._easel_hooks = []


def unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's (or a ControlNet's) big blocks, the unit `--lowvram` streams."""
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(getattr(unet, "up_blocks", None) or [])
    return [b for b in blocks if b is not None]


class _ModuleSwapper:
    """A forward pre-hook that brings a module to the device and sends the previous one back (A1111 medvram)."""

    def __init__(self, device: torch.device, offload: torch.device):
        self.device = device
        self.offload = offload
        self.current: torch.nn.Module | None = None
        self.transfers = 0

    def hook(self, module: torch.nn.Module, _inputs) -> None:
        if module is self.current:
            return
        if self.current is not None:
            self.current.to(self.offload)
        module.to(self.device)
        self.current = module
        self.transfers += 1
