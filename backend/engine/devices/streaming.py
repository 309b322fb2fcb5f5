"""Weight streaming for --medvram and --lowvram: weights live in RAM and a forward pre-hook brings each
part (a whole text encoder, VAE half or UNet for --medvram; a UNet block's resnets and attentions, or a
FLUX/SD3 transformer block's attention and feed-forward layers, for --lowvram) to the device when it runs,
dropping the one before.

Also what the policy needs to cut a UNet into those units (`unet_blocks`, `stream_units`), keep the
largest of them resident (`largest_within`), move the rest (`move_all_but`) and page-lock RAM for
asynchronous copies (`pin_module`). Works with any device pair, including CPU -> CPU, where it copies
the weights all the same; the tests use that to count transfers on a machine without a GPU.
"""
from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)

MiB = 1 << 20
# UNet parts that are tiny and used once per step: always resident when the UNet is streamed.
UNET_SMALL_PARTS = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "class_embedding",
                    "encoder_hid_proj", "conv_norm_out", "conv_act", "conv_out")


def tensor_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.parameters()) + \
        sum(t.numel() * t.element_size() for t in module.buffers())



def unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's (or a ControlNet's) big blocks, the unit `--lowvram` streams. A FLUX/SD3 transformer (or a
    FLUX ControlNet) has no down/up blocks: its blocks are `transformer_blocks` then `single_transformer_blocks`
    (FLUX), in the order they run; the embedders and the output layers around them stay resident."""
    if not hasattr(unet, "down_blocks") and hasattr(unet, "transformer_blocks"):
        blocks = list(unet.transformer_blocks) + list(getattr(unet, "single_transformer_blocks", None) or [])
    else:
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


def largest_within(units: list[torch.nn.Module], budget: int) -> set[int]:
    """ids of the largest units whose total fits in `budget` (they hold the most weight per compute)."""
    keep, used = set(), 0
    for unit in sorted(units, key=tensor_bytes, reverse=True):
        size = tensor_bytes(unit)
        if used + size <= budget:
            keep.add(id(unit))
            used += size
    return keep


def move_all_but(root: torch.nn.Module, streamed: list[torch.nn.Module], device: torch.device) -> None:
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

