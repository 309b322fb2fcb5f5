"""The device policy: where each model part lives and in which dtype.

One object, built from the flags (and a few settings), decides:
- the compute device: CUDA when present unless `--use-cpu all|<part>`; else the CPU;
- dtypes: float16 on CUDA (`--no-half`, `--no-half-vae`, `--precision full` keep float32); on the CPU
  bfloat16 for the UNet and VAE where the CPU has bf16 hardware (AVX512-BF16/AMX; setting `cpu_bf16`
  auto/on/off), else float32; the text encoders stay float32 on the CPU (they run once per prompt);
- residency, per model (a `Plan`):
    resident   everything on the device;
    medvram    text encoders, UNet, VAE (and ControlNets) in RAM, each brought to the device whole
               when it runs, the previous one dropped (one at a time);
    lowvram    as medvram for text encoders and VAE; the UNet streamed in small units (a block's
               resnets and attentions; a FLUX/SD3 transformer block's attention and feed-forward
               layers), the next unit's weights copied on a separate CUDA stream while the current one
               computes; a small budget of the largest units stays resident;
    auto       (no flag) resident when it fits in the memory actually free, else partial loading
               like Forge/ComfyUI: text encoders and VAE swapped, as much of the UNet resident as
               fits, the rest streamed. An out-of-memory error during a job steps the model down to a
               smaller residency (`degrade`) and the job is run again;
- FLUX.1 / SD3 (`families.flow_model.FlowModel`): the transformer is placed as the UNet, the encoders of its
  dict as the text encoders. Stored float8 and GGUF weights keep their dtype (`parts.cast_floating`); T5-XXL
  computes in bfloat16 (float32 where the device has no bf16), never float16. Whenever the text encoders are
  swapped (medvram, lowvram, partial), T5-XXL (4.9-9.5 GB) is brought to the device for its one pass per prompt
  only when it fits in the memory free there, as Forge does; otherwise it stays in RAM and computes on the CPU
  (`encoder_devices` says so to the `FlowConditioner`);
- attention (PyTorch SDPA by default, xformers with `--xformers` when installed, A1111's other
  `--opt-*` names), channels-last, and `--compile`.

Pipelines never move weights themselves: they call `place(loaded)` once and create their inputs on
`policy.device`. The mechanisms live beside this module: `streaming` (the offload hooks), `attention`,
`compilation`, `cpu` (what the CPU offers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from backend.engine.devices.attention import attention_from_args, configure_attention
from backend.engine.devices.compilation import compile_unet
from backend.core.job_options import JobOptions
from backend.engine.devices.cpu import cpu_bf16_supported, cpu_description
from backend.engine.devices.parts import (T5_PART, cast_floating, encoder_modules, is_flow, named_encoders,
                                          retarget_float8_compute, stored_bytes, t5_dtype)
from backend.engine.devices.streaming import (MiB, WeightStreamer, largest_within, move_all_but, pin_module,
                                              stream_units, tensor_bytes, unet_blocks)
from backend.engine.loaded_model import Companion, LoadedModel

log = logging.getLogger(__name__)

MODES = ("auto", "resident", "medvram", "lowvram")
GiB = 1 << 30
# Activation memory kept free for sampling when deciding what fits (per family; an OOM still degrades).
INFERENCE_RESERVE = {"sd1": int(1.5 * GiB), "sd2": 2 * GiB, "sdxl": 3 * GiB, "flux": 3 * GiB, "sd3": 3 * GiB}
# Device memory a T5-XXL pass needs besides its weights (its activations: a few hundred tokens x 4096 wide).
T5_PASS_RESERVE = 512 * MiB


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- the plan for one model ---------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Where one model's parts live. unet: resident | swapped | streamed; others: resident | swapped."""

    unet: str = "resident"
    others: str = "resident"
    budget: int = 0  # streamed UNet: bytes of its units kept resident (largest first)

    @property
    def name(self) -> str:
        if self.unet == "resident" and self.others == "resident":
            return "resident"
        if self.unet == "swapped":
            return "medvram"
        if self.unet == "streamed":
            return "lowvram"
        return "partial"


RESIDENT = Plan()
MEDVRAM = Plan("swapped", "swapped")


@dataclass
class DevicePolicy:
    device: torch.device
    dtype: torch.dtype  # UNet (and ControlNets)
    vae_dtype: torch.dtype
    mode: str = "resident"  # auto | resident | medvram | lowvram
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    text_dtype: torch.dtype | None = None  # None: as `dtype`
    channels_last: bool = False
    attention: str = "sdp"
    compile: bool = False
    nan_check: bool = True
    medvram_sdxl: bool = False  # --medvram-sdxl: medvram for SDXL models only
    lowvram_budget: int = 512 * MiB  # --lowvram: UNet weights kept resident (the largest units)
    unit_bytes: int = 96 * MiB  # streamed units are split until below this (where the module allows)
    prefetch: bool = True
    pin_memory: bool = True
    # The memory free for models on the device; None: measured (CUDA: mem_get_info; CPU: available RAM).
    free_memory: Callable[[], int] | None = None
    # What the dtypes were derived from (kept so a settings change can re-derive them).
    cpu_bf16: str = "auto"
    full_precision: bool = False
    no_half_vae: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.text_dtype is None:
            self.text_dtype = self.dtype

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args, part: str = "sd", options: dict | None = None) -> "DevicePolicy":
        device = device_for(args, part)
        full = bool(getattr(args, "no_half", False)) or getattr(args, "precision", "autocast") == "full"
        no_half_vae = bool(getattr(args, "no_half_vae", False))
        mode = "resident"
        if device.type == "cuda":
            mode = "lowvram" if getattr(args, "lowvram", False) else "medvram" if getattr(args, "medvram", False) else "auto"
        policy = cls(device=device, dtype=torch.float32, vae_dtype=torch.float32, mode=mode,
                     channels_last=bool(getattr(args, "opt_channelslast", False)),
                     attention=attention_from_args(args), compile=bool(getattr(args, "compile", False)),
                     nan_check=not getattr(args, "disable_nan_check", False),
                     medvram_sdxl=bool(getattr(args, "medvram_sdxl", False)) and mode == "auto",
                     cpu_bf16=str(JobOptions.of(options or {})["cpu_bf16"]), full_precision=full, no_half_vae=no_half_vae)
        policy._derive_dtypes()
        return policy

    def _derive_dtypes(self) -> None:
        if self.device.type == "cpu":
            bf16 = not self.full_precision and (self.cpu_bf16 == "on" or (self.cpu_bf16 == "auto" and cpu_bf16_supported()))
            self.dtype = torch.bfloat16 if bf16 else torch.float32
            self.vae_dtype = torch.bfloat16 if bf16 and not self.no_half_vae else torch.float32
            self.text_dtype = torch.float32
            self.channels_last = self.channels_last or bf16  # oneDNN's bf16 convolutions want NHWC
        else:
            self.dtype = torch.float32 if self.full_precision else torch.float16
            self.vae_dtype = torch.float32 if (self.full_precision or self.no_half_vae) else torch.float16
            self.text_dtype = self.dtype

    def apply_options(self, options: dict) -> bool:
        """Take the settings that affect placement (`cpu_bf16`); True when the dtypes changed."""
        value = str(options.get("cpu_bf16", self.cpu_bf16))
        if value == self.cpu_bf16:
            return False
        before = (self.dtype, self.vae_dtype, self.text_dtype)
        self.cpu_bf16 = value
        self._derive_dtypes()
        return before != (self.dtype, self.vae_dtype, self.text_dtype)

    @property
    def offloads(self) -> bool:
        return self.mode in ("medvram", "lowvram")

    def describe(self) -> str:
        text = (f"device={self.device} dtype={_dtype_name(self.dtype)} vae={_dtype_name(self.vae_dtype)} "
                f"text={_dtype_name(self.text_dtype)} mode={self.mode} attention={self.attention}")
        if self.channels_last:
            text += " channels_last"
        if self.compile:
            text += " compile"
        if self.device.type == "cpu":
            text += f" cpu={cpu_description()} threads={torch.get_num_threads()}"
        return text

    # -- memory -----------------------------------------------------------------------------------
    def device_free_bytes(self) -> int:
        """Memory free for models on the compute device (CUDA: driver-free plus the allocator's unused cache)."""
        if self.free_memory is not None:
            return int(self.free_memory())
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        import psutil
        return int(psutil.virtual_memory().available)

    def model_bytes(self, loaded: LoadedModel) -> dict:
        """Sizes of the parts as they will be stored: in the dtypes this policy gives them, float8 and quantized
        (GGUF) weights at their stored size. "text": every encoder's; "t5": T5-XXL's (0 without one), also in "text"."""
        model = loaded.model
        text = [(name, stored_bytes(e, self.encoder_dtype(name))) for name, e in named_encoders(model)]
        return {"unet": stored_bytes(model.unet, self.dtype), "vae": stored_bytes(model.vae, self.vae_dtype_for(loaded)),
                "text": [size for _name, size in text], "t5": sum(size for name, size in text if name == T5_PART)}

    def encoder_dtype(self, name: str) -> torch.dtype:
        """The dtype text encoder `name` computes in: `text_dtype`, except T5-XXL, never in float16 (`parts.t5_dtype`)."""
        return t5_dtype(self.text_dtype, self.device) if name == T5_PART else self.text_dtype

    def bytes_on_device(self, loaded: LoadedModel) -> int:
        if self.device == self.offload_device:
            return 0
        return sum(t.numel() * t.element_size() for part in self.parts(loaded.model)
                   for t in list(part.parameters()) + list(part.buffers()) if t.device == self.device)

    def plan_for(self, loaded: LoadedModel) -> Plan:
        """Decide where this model's parts live (see the module docstring)."""
        if loaded.forced_plan is not None:
            return loaded.forced_plan
        model = loaded.model
        mode = self.mode
        if mode == "auto" and self.medvram_sdxl and getattr(model, "family", "") == "sdxl":
            mode = "medvram"
        if mode == "resident":
            return RESIDENT
        if mode == "medvram":
            return MEDVRAM
        if mode == "lowvram":
            return Plan("streamed", "swapped", self.lowvram_budget)
        sizes = self.model_bytes(loaded)
        free = self.device_free_bytes() + self.bytes_on_device(loaded)
        reserve = INFERENCE_RESERVE.get(getattr(model, "family", "sd1"), 2 * GiB)
        unet, others = sizes["unet"], sizes["vae"] + sum(sizes["text"])
        # T5-XXL is not counted among the swapped parts: where it does not fit beside the UNet it runs on the CPU
        names = [name for name, _enc in named_encoders(model)]
        swapped = [size for name, size in zip(names, sizes["text"]) if name != T5_PART]
        biggest_other = max([sizes["vae"], *swapped])
        if unet + others + reserve <= free:
            return RESIDENT
        if unet + biggest_other + reserve <= free:
            return Plan("resident", "swapped")
        budget = free - reserve - biggest_other - 2 * self.unit_bytes
        return Plan("streamed", "swapped", max(0, int(budget)))

    def mode_for(self, loaded: LoadedModel) -> str:
        """The effective residency of a placed model: resident | partial | medvram | lowvram."""
        plan = loaded.plan or self.plan_for(loaded)
        return plan.name

    def degrade(self, loaded: LoadedModel) -> bool:
        """After an out-of-memory error: give the model a smaller residency. False when none is left."""
        if self.mode == "resident":
            return False
        plan = loaded.plan or self.plan_for(loaded)
        unet = tensor_bytes(loaded.model.unet)
        if plan.others == "resident":
            smaller = Plan(plan.unet, "swapped", plan.budget)
        elif plan.unet == "resident":
            smaller = Plan("streamed", "swapped", unet // 2)
        elif plan.unet == "swapped":
            smaller = Plan("streamed", "swapped", min(self.lowvram_budget, unet // 2))
        elif plan.unet == "streamed" and plan.budget > 0:
            smaller = Plan("streamed", "swapped", plan.budget // 2 if plan.budget > 64 * MiB else 0)
        else:
            return False
        log.warning("out of memory: %s now runs as %s (resident UNet budget %.0f MiB)",
                    loaded.family or "model", smaller.name, smaller.budget / MiB)
        loaded.forced_plan = smaller
        self.place(loaded)
        return True

    # -- placing ----------------------------------------------------------------------------------
    @staticmethod
    def parts(model) -> list[torch.nn.Module]:
        return [model.unet, model.vae, *encoder_modules(model)]

    def encoder_devices(self, loaded: LoadedModel) -> dict[str, torch.device]:
        """{encoder name: device} of the text encoders of a placed model that compute elsewhere than
        `self.device` (T5-XXL kept on the CPU), for `FlowConditioner(..., encoder_devices=...)`; {} when all
        run on the device."""
        return dict(loaded.encoder_devices)

    def vae_dtype_for(self, loaded: LoadedModel) -> torch.dtype:
        return torch.float32 if loaded.vae_upcast else self.vae_dtype

    def place(self, loaded: LoadedModel) -> None:
        """Put a loaded checkpoint's parts where this policy says, installing the offload hooks if needed
        (recorded in `loaded`: its placement, plan, streamer and hooks)."""
        plan = self.plan_for(loaded)
        current = loaded.plan
        if current is not None and loaded.forced_plan is None \
                and current.unet == plan.unet == "streamed" and current.others == plan.others \
                and abs(current.budget - plan.budget) < 256 * MiB:
            plan = current  # the free memory moved a little: not worth re-placing the model
        vae_dtype = self.vae_dtype_for(loaded)
        key = (self.device, plan, self.dtype, vae_dtype, self.text_dtype, self.attention, self.channels_last)
        if loaded.placed == key:
            return
        self._unhook(loaded)
        model = loaded.model
        resident = plan == RESIDENT
        # Cast where the part will live: on the device when resident, else in RAM (no device memory spent).
        # Stored float8 / quantized weights keep their dtype (their layers cast them as they compute).
        encoders = named_encoders(model)
        for part, dtype in ((model.unet, self.dtype), (model.vae, vae_dtype),
                            *((enc, self.encoder_dtype(name)) for name, enc in encoders)):
            if not resident:
                part.to(self.offload_device)
            cast_floating(part, dtype)
        for name, enc in encoders:
            retarget_float8_compute(enc, self.encoder_dtype(name))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for part in (model.unet, model.vae):
            part.to(memory_format=fmt)
        # FLUX/SD3 transformers keep their own (joint) attention processors; the SD UNet and every VAE get the flag's
        for part in ((model.vae,) if is_flow(model) else (model.unet, model.vae)):
            configure_attention(part, self.attention)
        if resident:
            for part in self.parts(model):
                part.to(self.device)
        else:
            streamer = WeightStreamer(self.device, self.offload_device, prefetch=self.prefetch and plan.unet == "streamed",
                                      max_prefetch_bytes=2 * self.unit_bytes)
            hooks: list = []
            t5 = next((enc for name, enc in encoders if name == T5_PART), None)
            swapped = [*(enc for enc in encoder_modules(model) if enc is not t5), model.vae.encoder,
                       model.vae.decoder, model.vae.quant_conv, model.vae.post_quant_conv]
            swapped = [m for m in swapped if m is not None]
            if plan.others == "resident":
                for part in (model.vae, *encoder_modules(model)):
                    part.to(self.device)
                swapped, t5 = [], None
            elif plan.others == "swapped":
                for m in model.vae.children():  # the VAE's own small leftovers, if any, stay resident
                    if all(m is not s for s in swapped):
                        m.to(self.device)
            if plan.unet == "resident":
                model.unet.to(self.device)
            elif plan.unet == "swapped":
                swapped.append(model.unet)
            else:
                units = stream_units(model.unet, self.unit_bytes)
                keep = largest_within(units, plan.budget)
                streamed = [u for u in units if id(u) not in keep]
                move_all_but(model.unet, streamed, self.device)
                swapped.extend(streamed)
            if t5 is not None:  # T5-XXL: swapped onto the device for its pass when it fits there, else on the CPU
                if self._t5_fits(t5):
                    swapped.insert(0, t5)
                else:
                    loaded.encoder_devices = {T5_PART: self.offload_device}
                    log.info("T5-XXL (%.1f GiB) stays in RAM and runs on the CPU: %.1f GiB free on %s",
                             stored_bytes(t5) / GiB, self.device_free_bytes() / GiB, self.device)
            if self.pin_memory and self.device.type == "cuda":
                for m in swapped:
                    pin_module(m)
            for m in swapped:
                hooks.append(m.register_forward_pre_hook(streamer.hook))
            streamer.units = len(swapped)
            loaded.streamer = streamer  # shared with models that run beside the UNet (ControlNets)
            loaded.place_hooks = hooks
        if self.compile and plan.unet == "resident":
            if loaded.compiled_for != self.device.type:
                loaded.eager_forward = loaded.eager_forward or model.unet.forward
                compile_unet(model.unet, self.device, loaded.eager_forward)
                loaded.compiled_for = self.device.type
        elif self.compile:
            log.warning("--compile is skipped while the UNet is offloaded (%s)", plan.name)
        loaded.plan = plan
        loaded.placed = key
        log.info("model placed: %s, plan=%s", self.describe(), plan.name)

    def _t5_fits(self, t5: torch.nn.Module) -> bool:
        """Whether T5-XXL, swapped in alone for its pass, fits in the memory free on the device now."""
        return stored_bytes(t5) + T5_PASS_RESERVE <= self.device_free_bytes()

    def settle(self, loaded: LoadedModel) -> None:
        """Put streamed weights back in RAM (between jobs, and before anyone changes weights)."""
        if loaded.streamer is not None:
            loaded.streamer.settle()

    def _unhook(self, loaded: LoadedModel) -> None:
        for handle in loaded.place_hooks:
            handle.remove()
        loaded.place_hooks = []
        self.settle(loaded)
        loaded.streamer = None
        loaded.plan = None
        loaded.encoder_devices = {}

    def release(self, loaded: LoadedModel) -> None:
        """Move a model, and the companions placed beside it, off the accelerator (when it leaves the GPU cache)."""
        for companion in list(loaded.companions.values()):
            self.release_beside(companion.module, loaded)
        self._unhook(loaded)
        for part in self.parts(loaded.model):
            part.to(self.offload_device)
        loaded.placed = None

    def upcast_vae(self, loaded: LoadedModel) -> None:
        """Run this model's VAE in float32 from now on (after it produced NaNs in half precision)."""
        if loaded.vae_upcast:
            return
        loaded.vae_upcast = True
        self.settle(loaded)
        loaded.placed = None
        self.place(loaded)

    def place_beside(self, module: torch.nn.Module, owner: LoadedModel) -> None:
        """Place a model that runs beside `owner`'s UNet (a ControlNet) by the same policy as that UNet.

        Resident: on the device. --medvram: kept in RAM and swapped in whole by the owner's swapper,
        so it and the UNet take turns on the device. --lowvram: its big blocks are streamed one at a
        time by the same swapper, its small parts stay on the device. It is recorded as `owner`'s
        companion (`LoadedModel.companions`), so releasing `owner` releases it too.
        """
        cast_floating(module, self.dtype)  # a float8 ControlNet stays float8
        mode = self.mode_for(owner)
        swapper = owner.streamer if mode in ("medvram", "lowvram") else None
        placed = (self.device, mode, id(swapper))
        companion = owner.companion(module)
        if companion is not None and companion.placed == placed:
            return
        if companion is not None:
            self._remove_hooks(companion)
        configure_attention(module, self.attention)
        hooks = []
        if swapper is None:
            module.to(self.device)
        else:
            module.to(self.offload_device)
            targets = [module] if mode == "medvram" else unet_blocks(module)
            if mode == "lowvram":
                streamed = {id(b) for b in targets}
                for child in module.children():
                    if id(child) not in streamed and not isinstance(child, torch.nn.ModuleList):
                        child.to(self.device)
                    elif isinstance(child, torch.nn.ModuleList) and not any(id(c) in streamed for c in child):
                        child.to(self.device)
            hooks = [t.register_forward_pre_hook(swapper.hook) for t in targets]
        owner.companions[id(module)] = Companion(module, placed, hooks)

    def release_beside(self, module: torch.nn.Module, owner: LoadedModel) -> None:
        """Move a model placed by `place_beside` off the accelerator; it is no longer `owner`'s companion."""
        companion = owner.companions.pop(id(module), None)
        if companion is not None:
            self._remove_hooks(companion)
        module.to(self.offload_device)

    @staticmethod
    def _remove_hooks(companion: Companion) -> None:
        for handle in companion.hooks:
            handle.remove()
        companion.hooks = []


def device_for(args, part: str = "sd") -> torch.device:
    """The device for `part` (sd, gfpgan, codeformer, esrgan, interrogate) under `--use-cpu` (A1111)."""
    use_cpu = set(getattr(args, "use_cpu", []) or [])
    if torch.cuda.is_available() and not ({"all", part} & use_cpu):
        index = getattr(args, "device_id", None)
        return torch.device(f"cuda:{int(index)}" if index not in (None, "") else "cuda")
    return torch.device("cpu")
