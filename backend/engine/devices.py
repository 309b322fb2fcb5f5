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
               resnets and attentions), the next unit's weights copied on a separate CUDA stream while
               the current one computes; a small budget of the largest units stays resident;
    auto       (no flag) resident when it fits in the memory actually free, else partial loading
               like Forge/ComfyUI: text encoders and VAE swapped, as much of the UNet resident as
               fits, the rest streamed. An out-of-memory error during a job steps the model down to a
               smaller residency (`degrade`) and the job is run again;
- attention (PyTorch SDPA by default, xformers with `--xformers` when installed, A1111's other
  `--opt-*` names), channels-last, and `--compile`.

Pipelines never move weights themselves: they call `place(model)` once and create their inputs on
`policy.device`. Streaming works with any device pair, including CPU -> CPU, where it copies the
weights all the same; the tests use that to count transfers on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "resident", "medvram", "lowvram")
ATTENTION_CHOICES = ("sdp", "sdp-no-mem", "xformers", "split", "basic")
MiB = 1 << 20
GiB = 1 << 30
# Activation memory kept free for sampling when deciding what fits (per family; an OOM still degrades).
INFERENCE_RESERVE = {"sd1": int(1.5 * GiB), "sd2": 2 * GiB, "sdxl": 3 * GiB}
# UNet parts that are tiny and used once per step: always resident when the UNet is streamed.
UNET_SMALL_PARTS = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "class_embedding",
                    "encoder_hid_proj", "conv_norm_out", "conv_act", "conv_out")


# -- CPU capabilities ---------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_bf16_supported() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags or ("bf16" in flags and os.uname().machine in ("aarch64", "arm64")):
        return True
    if flags or checker is None:
        return False
    try:  # no /proc/cpuinfo: ask oneDNN (it also says yes for plain AVX512, so only as a fallback)
        return bool(checker()) and torch.backends.cpu.get_cpu_capability() != "AVX2"
    except Exception:  # noqa: BLE001 - an op missing from this build
        return False


def cpu_description() -> str:
    flags = cpu_flags()
    extras = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(extras) or 'no flags read'})"


def tensor_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.parameters()) + \
        sum(t.numel() * t.element_size() for t in module.buffers())


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
                     cpu_bf16=str((options or {}).get("cpu_bf16", "auto")), full_precision=full, no_half_vae=no_half_vae)
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

    def model_bytes(self, model) -> dict[str, int]:
        """Sizes of the parts in the dtypes this policy gives them."""
        def sized(module, dtype):
            return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                       for t in list(module.parameters()) + list(module.buffers()))
        return {"unet": sized(model.unet, self.dtype), "vae": sized(model.vae, self.vae_dtype_for(model)),
                "text": [sized(e, self.text_dtype) for e in model.text_encoders]}

    def bytes_on_device(self, model) -> int:
        if self.device == self.offload_device:
            return 0
        return sum(t.numel() * t.element_size() for part in self.parts(model)
                   for t in list(part.parameters()) + list(part.buffers()) if t.device == self.device)

    def plan_for(self, model) -> Plan:
        """Decide where this model's parts live (see the module docstring)."""
        forced = getattr(model, "_easel_forced_plan", None)
        if forced is not None:
            return forced
        mode = self.mode
        if mode == "auto" and self.medvram_sdxl and getattr(model, "family", "") == "sdxl":
            mode = "medvram"
        if mode == "resident":
            return RESIDENT
        if mode == "medvram":
            return MEDVRAM
        if mode == "lowvram":
            return Plan("streamed", "swapped", self.lowvram_budget)
        sizes = self.model_bytes(model)
        free = self.device_free_bytes() + self.bytes_on_device(model)
        reserve = INFERENCE_RESERVE.get(getattr(model, "family", "sd1"), 2 * GiB)
        unet, others = sizes["unet"], sizes["vae"] + sum(sizes["text"])
        biggest_other = max([sizes["vae"], *sizes["text"]])
        if unet + others + reserve <= free:
            return RESIDENT
        if unet + biggest_other + reserve <= free:
            return Plan("resident", "swapped")
        budget = free - reserve - biggest_other - 2 * self.unit_bytes
        return Plan("streamed", "swapped", max(0, int(budget)))

    def mode_for(self, model) -> str:
        """The effective residency of a placed model: resident | partial | medvram | lowvram."""
        plan = getattr(model, "_easel_plan", None) or self.plan_for(model)
        return plan.name

    def degrade(self, model) -> bool:
        """After an out-of-memory error: give the model a smaller residency. False when none is left."""
        if self.mode == "resident":
            return False
        plan = getattr(model, "_easel_plan", None) or self.plan_for(model)
        unet = tensor_bytes(model.unet)
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
                    getattr(model, "family", "model"), smaller.name, smaller.budget / MiB)
        model._easel_forced_plan = smaller
        self.place(model)
        return True

    # -- placing ----------------------------------------------------------------------------------
    @staticmethod
    def parts(model) -> list[torch.nn.Module]:
        return [model.unet, model.vae, *model.text_encoders]

    def vae_dtype_for(self, model) -> torch.dtype:
        return torch.float32 if getattr(model, "_easel_vae_upcast", False) else self.vae_dtype

    def place(self, model) -> None:
        """Put a loaded `SDModel`'s parts where this policy says, installing the offload hooks if needed."""
        plan = self.plan_for(model)
        current = getattr(model, "_easel_plan", None)
        if current is not None and getattr(model, "_easel_forced_plan", None) is None \
                and current.unet == plan.unet == "streamed" and current.others == plan.others \
                and abs(current.budget - plan.budget) < 256 * MiB:
            plan = current  # the free memory moved a little: not worth re-placing the model
        vae_dtype = self.vae_dtype_for(model)
        key = (self.device, plan, self.dtype, vae_dtype, self.text_dtype, self.attention, self.channels_last)
        if getattr(model, "_easel_placed", None) == key:
            return
        self._unhook(model)
        resident = plan == RESIDENT
        # Cast where the part will live: on the device when resident, else in RAM (no device memory spent).
        for part, dtype in ((model.unet, self.dtype), (model.vae, vae_dtype),
                            *((enc, self.text_dtype) for enc in model.text_encoders)):
            if not resident:
                part.to(self.offload_device)
            part.to(dtype=dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for part in (model.unet, model.vae):
            part.to(memory_format=fmt)
            configure_attention(part, self.attention)
        if resident:
            for part in self.parts(model):
                part.to(self.device)
        else:
            streamer = WeightStreamer(self.device, self.offload_device, prefetch=self.prefetch and plan.unet == "streamed",
                                      max_prefetch_bytes=2 * self.unit_bytes)
            hooks: list = []
            swapped = [*model.text_encoders, model.vae.encoder, model.vae.decoder, model.vae.quant_conv,
                       model.vae.post_quant_conv]
            swapped = [m for m in swapped if m is not None]
            if plan.others == "resident":
                for part in (model.vae, *model.text_encoders):
                    part.to(self.device)
                swapped = []
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
                keep = _largest_within(units, plan.budget)
                streamed = [u for u in units if id(u) not in keep]
                _move_all_but(model.unet, streamed, self.device)
                swapped.extend(streamed)
            if self.pin_memory and self.device.type == "cuda":
                for m in swapped:
                    pin_module(m)
            for m in swapped:
                hooks.append(m.register_forward_pre_hook(streamer.hook))
            streamer.units = len(swapped)
            model._easel_swapper = streamer  # shared with models that run beside the UNet (ControlNets)
            model._easel_place_hooks = hooks
        if self.compile and plan.unet == "resident":
            compile_unet(model.unet, self.device)
        elif self.compile:
            log.warning("--compile is skipped while the UNet is offloaded (%s)", plan.name)
        model._easel_plan = plan
        model._easel_placed = key
        log.info("model placed: %s, plan=%s", self.describe(), plan.name)

    def settle(self, model) -> None:
        """Put streamed weights back in RAM (between jobs, and before anyone changes weights)."""
        streamer = getattr(model, "_easel_swapper", None)
        if streamer is not None:
            streamer.settle()

    def _unhook(self, model) -> None:
        for handle in getattr(model, "_easel_place_hooks", []):
            handle.remove()
        model._easel_place_hooks = []
        self.settle(model)
        model._easel_swapper = None
        model._easel_plan = None

    def release(self, model) -> None:
        """Move a model off the accelerator (used when it leaves the GPU cache)."""
        self._unhook(model)
        for part in self.parts(model):
            part.to(self.offload_device)
        model._easel_placed = None

    def upcast_vae(self, model) -> None:
        """Run this model's VAE in float32 from now on (after it produced NaNs in half precision)."""
        if getattr(model, "_easel_vae_upcast", False):
            return
        model._easel_vae_upcast = True
        self.settle(model)
        model._easel_placed = None
        self.place(model)

    def place_beside(self, module: torch.nn.Module, owner) -> None:
        """Place a model that runs beside `owner`'s UNet (a ControlNet) by the same policy as that UNet.

        Resident: on the device. --medvram: kept in RAM and swapped in whole by the owner's swapper,
        so it and the UNet take turns on the device. --lowvram: its big blocks are streamed one at a
        time by the same swapper, its small parts stay on the device.
        """
        module.to(dtype=self.dtype)
        mode = self.mode_for(owner)
        swapper = getattr(owner, "_easel_swapper", None) if mode in ("medvram", "lowvram") else None
        placed = (self.device, mode, id(swapper))
        if getattr(module, "_easel_placed", None) == placed:
            return
        self._remove_hooks(module)
        configure_attention(module, self.attention)
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


def device_for(args, part: str = "sd") -> torch.device:
    """The device for `part` (sd, gfpgan, codeformer, esrgan, interrogate) under `--use-cpu` (A1111)."""
    use_cpu = set(getattr(args, "use_cpu", []) or [])
    if torch.cuda.is_available() and not ({"all", part} & use_cpu):
        index = getattr(args, "device_id", None)
        return torch.device(f"cuda:{int(index)}" if index not in (None, "") else "cuda")
    return torch.device("cpu")


def attention_from_args(args) -> str:
    """A1111's attention flags -> one of ATTENTION_CHOICES (xformers only when it is installed)."""
    if getattr(args, "xformers", False) or getattr(args, "force_enable_xformers", False):
        if xformers_available():
            return "xformers"
        log.warning("--xformers: the xformers package is not installed; using PyTorch SDPA attention")
    if getattr(args, "opt_sdp_no_mem_attention", False):
        return "sdp-no-mem"
    if getattr(args, "opt_sdp_attention", False):
        return "sdp"
    if getattr(args, "opt_sub_quad_attention", False) or getattr(args, "opt_split_attention", False):
        return "split"
    if getattr(args, "disable_opt_split_attention", False):
        return "basic"
    return "sdp"


def xformers_available() -> bool:
    import importlib.util
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a broken build
        return False


class SdpNoMemAttnProcessor:
    """PyTorch SDPA without the memory-efficient kernel (`--opt-sdp-no-mem-attention`: deterministic)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0
        self.inner = AttnProcessor2_0()

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
            return self.inner(*args, **kwargs)


def attention_processor(kind: str):
    from diffusers.models import attention_processor as ap
    if kind == "xformers":
        return ap.XFormersAttnProcessor()
    if kind == "split":
        return ap.SlicedAttnProcessor(slice_size=2)
    if kind == "basic":
        return ap.AttnProcessor()
    if kind == "sdp-no-mem":
        return SdpNoMemAttnProcessor()
    return ap.AttnProcessor2_0()


def configure_attention(module: torch.nn.Module, kind: str) -> None:
    """Give every diffusers `Attention` in `module` the processor for `kind` (once per kind)."""
    if getattr(module, "_easel_attention", "sdp") == kind:
        return
    from diffusers.models.attention_processor import Attention
    processor = attention_processor(kind)
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(processor)
    module._easel_attention = kind


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """`--compile`: torch.compile the UNet's forward, one graph per shape (CUDA graphs on the GPU)."""
    if getattr(unet, "_easel_compiled", None) == device.type:
        return
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    eager = getattr(unet, "_easel_eager_forward", None) or unet.forward
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(eager, mode=mode, dynamic=False)

    def forward(*args, **kwargs):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    unet._easel_eager_forward = eager
    unet.forward = forward
    unet._easel_compiled = device.type
    log.info("UNet compiled for %s (mode %s); the first run at each size takes longer", device, mode or "default")


def unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's (or a ControlNet's) big blocks, the unit `--lowvram` streams."""
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(getattr(unet, "up_blocks", None) or [])
    return [b for b in blocks if b is not None]


def stream_units(unet: torch.nn.Module, max_bytes: int) -> list[torch.nn.Module]:
    """Split the UNet's blocks into units that run in order: a block's resnets, attentions and samplers,
    split further (a transformer's layers) while a unit is larger than `max_bytes`."""
    units: list[torch.nn.Module] = []

    def split(module: torch.nn.Module) -> None:
        children = [c for c in module.children() if tensor_bytes(c) > 0]
        container = isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential))
        if container or (tensor_bytes(module) > max_bytes and children and _owns_no_tensors(module)):
            for child in children:
                split(child)
        else:
            units.append(module)

    for block in unet_blocks(unet):
        for child in block.children():
            if tensor_bytes(child) > 0:
                split(child)
    return units


def _owns_no_tensors(module: torch.nn.Module) -> bool:
    return not any(t is not None for t in module._parameters.values()) and \
        not any(t is not None for t in module._buffers.values())


def _largest_within(units: list[torch.nn.Module], budget: int) -> set[int]:
    """ids of the largest units whose total fits in `budget` (they hold the most weight per compute)."""
    keep, used = set(), 0
    for unit in sorted(units, key=tensor_bytes, reverse=True):
        size = tensor_bytes(unit)
        if used + size <= budget:
            keep.add(id(unit))
            used += size
    return keep


def _move_all_but(root: torch.nn.Module, streamed: list[torch.nn.Module], device: torch.device) -> None:
    """Move every tensor of `root` to `device` except those inside the streamed units."""
    skip = {id(t) for u in streamed for t in list(u.parameters()) + list(u.buffers())}
    for m in root.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) not in skip:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None and id(b) not in skip:
                m._buffers[name] = b.to(device)


def pin_module(module: torch.nn.Module) -> None:
    """Page-lock a module's weights in RAM so copies to the GPU run asynchronously."""
    try:
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None and p.device.type == "cpu" and not p.data.is_pinned():
                    p.data = p.data.pin_memory()
            for name, b in m._buffers.items():
                if b is not None and b.device.type == "cpu" and not b.is_pinned():
                    m._buffers[name] = b.pin_memory()
    except RuntimeError as exc:  # locked-memory limits: copies are synchronous then, still correct
        log.warning("could not pin model weights in RAM (%s); transfers will not overlap compute", exc)


# -- the streamer -------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("owner", "name", "is_param", "master", "copy", "version")

    def __init__(self, owner, name, is_param, master):
        self.owner, self.name, self.is_param, self.master = owner, name, is_param, master
        self.copy = None
        self.version = None

    def current(self) -> torch.Tensor:
        return self.owner._parameters[self.name].data if self.is_param else self.owner._buffers[self.name]

    def version_now(self) -> int:
        return (self.owner._parameters[self.name] if self.is_param else self.owner._buffers[self.name])._version

    def assign(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor
        self.version = self.version_now()


class _Loaded:
    __slots__ = ("module", "entries", "event", "nbytes", "assigned")

    def __init__(self, module, entries, event, nbytes):
        self.module, self.entries, self.event, self.nbytes = module, entries, event, nbytes
        self.assigned = False


class WeightStreamer:
    """A forward pre-hook that brings a unit's weights to the device when it runs and drops the previous unit.

    The weights' home is RAM (pinned when the device is CUDA); a unit on the device holds copies, so
    dropping it costs no copy back, unless its weights were changed in place while on the device
    (seen by the tensors' version counters), in which case they are written back first. With
    `prefetch`, the unit that ran after this one last time is copied on a separate CUDA stream while
    this one computes; at most two units are on the device at once (the CPU waits for the previous
    unit's kernels before starting the next copy). Also used whole-module for --medvram, where
    prefetch is off and exactly one part is on the device at a time.
    """

    def __init__(self, device: torch.device, offload: torch.device, *, prefetch: bool = False,
                 max_prefetch_bytes: int = 256 * MiB):
        self.device = torch.device(device)
        self.offload = torch.device(offload)
        self.prefetch = prefetch
        self.max_prefetch_bytes = max_prefetch_bytes
        self.current: torch.nn.Module | None = None
        self.units = 0
        self.transfers = 0  # units copied to the device (synchronously or ahead)
        self.prefetched = 0  # of which copied ahead, while another unit computed
        self.prefetch_hits = 0
        self.bytes_transferred = 0
        self.loaded_bytes = 0
        self.peak_loaded_bytes = 0
        self.peak_loaded_units = 0
        self.writebacks = 0
        self._loaded: dict[int, _Loaded] = {}
        self._next: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._prev_done = None
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._copy_stream = torch.cuda.Stream(self.device) if (cuda and prefetch) else None

    # the hook ------------------------------------------------------------------------------------
    def hook(self, module: torch.nn.Module, _inputs=None) -> None:
        if module is self.current:
            return
        previous = self.current
        if previous is not None:
            self._next[previous] = weakref.ref(module)
            self._drop(previous)
            if self._copy_stream is not None:
                self._prev_done = torch.cuda.Event()
                self._prev_done.record(torch.cuda.current_stream(self.device))
        for other in [r for k, r in self._loaded.items() if k != id(module)]:
            self._drop(other.module)  # a prefetch that guessed wrong
        self._bring(module)
        self.current = module
        if self.prefetch:
            ref = self._next.get(module)
            upcoming = ref() if ref is not None else None
            if upcoming is not None and upcoming is not module and id(upcoming) not in self._loaded \
                    and tensor_bytes(upcoming) <= self.max_prefetch_bytes:
                if self._prev_done is not None:
                    self._prev_done.synchronize()  # bounds device memory: the previous unit has finished
                self._loaded[id(upcoming)] = self._copy(upcoming, ahead=True)
                self.prefetched += 1
        self._account()

    def settle(self) -> None:
        """Every unit back to its RAM weights; nothing of this streamer left on the device."""
        for loaded in list(self._loaded.values()):
            self._drop(loaded.module)
        self.current = None
        self.loaded_bytes = 0
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    # internals -------------------------------------------------------------------------------------
    def _entries(self, module: torch.nn.Module) -> list[_Entry]:
        busy = {e.copy.data_ptr() for r in self._loaded.values() for e in r.entries if e.copy is not None}
        entries = []
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and self._is_home(p.data, busy):
                    entries.append(_Entry(m, name, True, p.data))
            for name, b in m._buffers.items():
                if b is not None and self._is_home(b, busy):
                    entries.append(_Entry(m, name, False, b))
        return entries

    def _is_home(self, t: torch.Tensor, busy: set) -> bool:
        if t.data_ptr() in busy and t.numel():
            return False
        return t.device == self.offload or (t.device.type == self.offload.type and self.offload.index is None)

    def _copy(self, module: torch.nn.Module, ahead: bool) -> _Loaded:
        entries = self._entries(module)
        for e in entries:
            e.version = e.version_now()
        event = None
        if self._copy_stream is not None and ahead:
            with torch.cuda.stream(self._copy_stream):
                for e in entries:
                    e.copy = torch.empty(e.master.shape, dtype=e.master.dtype, device=self.device)
                    e.copy.copy_(e.master, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            non_blocking = self.device.type == "cuda"
            for e in entries:
                e.copy = e.master.to(self.device, copy=True, non_blocking=non_blocking)
        nbytes = sum(e.master.numel() * e.master.element_size() for e in entries)
        self.transfers += 1
        self.bytes_transferred += nbytes
        return _Loaded(module, entries, event, nbytes)

    def _bring(self, module: torch.nn.Module) -> None:
        loaded = self._loaded.get(id(module))
        if loaded is None:
            loaded = self._copy(module, ahead=False)
            self._loaded[id(module)] = loaded
        else:
            self.prefetch_hits += 1
            if loaded.event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(loaded.event)
                for e in loaded.entries:
                    e.copy.record_stream(stream)
            for e in loaded.entries:  # changed in RAM since the copy was made: copy again
                if e.current().data_ptr() != e.master.data_ptr() or e.version_now() != e.version:
                    e.master = e.current()
                    e.copy = e.master.to(self.device, copy=True)
            known = {(id(e.owner), e.name) for e in loaded.entries}
            extra = [e for e in self._entries(module) if (id(e.owner), e.name) not in known]
            for e in extra:  # tensors added since (e.g. a LoRA layer)
                e.copy = e.master.to(self.device, copy=True)
            loaded.entries.extend(extra)
        for e in loaded.entries:
            e.assign(e.copy)
        loaded.assigned = True

    def _drop(self, module: torch.nn.Module) -> None:
        loaded = self._loaded.pop(id(module), None)
        if loaded is None:
            return
        if loaded.assigned:
            for e in loaded.entries:
                now = e.current()
                if now.data_ptr() == e.copy.data_ptr():
                    if e.version_now() != e.version:  # changed in place on the device: keep the change
                        e.master.copy_(now)
                        self.writebacks += 1
                    e.assign(e.master)
                elif now.device != self.offload:  # replaced by someone else: keep theirs, in RAM
                    e.assign(now.to(self.offload))
        for e in loaded.entries:
            e.copy = None
        if self.current is module:
            self.current = None

    def _account(self) -> None:
        self.loaded_bytes = sum(r.nbytes for r in self._loaded.values())
        self.peak_loaded_bytes = max(self.peak_loaded_bytes, self.loaded_bytes)
        self.peak_loaded_units = max(self.peak_loaded_units, len(self._loaded))


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run a block with `n` intra-op threads (None: unchanged)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
