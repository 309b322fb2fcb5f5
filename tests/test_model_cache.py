"""The backend's checkpoint cache: switching back to a cached checkpoint reads no file; the limit evicts."""
from __future__ import annotations

import argparse

import pytest

from backend.engine import model_loader
from backend.checkpoints import HashCache
from backend.core.cmd_args import parse_args
from backend.engine.devices import DevicePolicy
from backend.engine.worker import ModelCache


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    reads = []
    real = model_loader.read_state_dict

    def counting_read(path, *a, **kw):
        reads.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(model_loader, "read_state_dict", counting_read)
    args = parse_args(["--use-cpu", "all", "--data-dir", str(tmp_path)])
    c = ModelCache(DevicePolicy.from_args(args), HashCache(tmp_path / "hashes.json"))
    c.available_ram = lambda: 1 << 40  # other processes' memory must not decide these tests (one test sets it)
    c.reads = reads
    return c


def test_switching_back_to_a_cached_checkpoint_reads_no_file(cache, tiny_models):
    sd1 = cache.get(tiny_models["sd1"], limit=2)
    sdxl = cache.get(tiny_models["sdxl"], limit=2)
    assert (sd1.model.family, sdxl.model.family) == ("sd1", "sdxl")
    reads_before = len(cache.reads)
    again = cache.get(tiny_models["sd1"], limit=2)
    assert again is sd1
    assert len(cache.reads) == reads_before and cache.loads == 2


def test_cache_limit_evicts_least_recently_used(cache, tiny_models):
    cache.get(tiny_models["sd1"], limit=1)
    cache.get(tiny_models["sdxl"], limit=1)
    assert len(cache.models) == 1
    cache.get(tiny_models["sd1"], limit=1)
    assert cache.loads == 3


def test_eviction_is_least_recently_used(cache, tiny_models):
    a, b, c = tiny_models["sd1"], tiny_models["sdxl"], tiny_models["sd1_inpaint"]
    cache.get(a, limit=2)
    cache.get(b, limit=2)
    cache.get(a, limit=2)  # a is now the most recent
    cache.get(c, limit=2)  # evicts b, the least recently used
    assert [key[0] for key in cache.models] == [str(a), str(c)]
    reads = len(cache.reads)
    cache.get(a, limit=2)
    assert len(cache.reads) == reads and cache.loads == 3


def test_a_cached_switch_opens_no_file(cache, tiny_models, monkeypatch):
    import builtins
    import io
    sd1 = cache.get(tiny_models["sd1"], limit=2)
    cache.get(tiny_models["sdxl"], limit=2)
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **kw: opened.append("safetensors") or {})
    assert cache.get(tiny_models["sd1"], limit=2) is sd1
    assert not [f for f in opened if f.endswith((".safetensors", ".ckpt")) or f == "safetensors"]


def test_evicted_models_are_freed_and_ram_does_not_grow(cache, tiny_models):
    """Switching back and forth with room for one: each evicted model is garbage (no reference kept by hooks,
    the cache or the policy), and the process's RSS stays flat across many switches."""
    import gc
    import weakref

    import psutil
    proc = psutil.Process()
    first = cache.get(tiny_models["sd1"], limit=1)
    ref = weakref.ref(first)
    unet_ref = weakref.ref(first.model.unet)
    del first
    cache.get(tiny_models["sdxl"], limit=1)
    gc.collect()
    assert ref() is None and unet_ref() is None
    for i in range(4):  # warm up allocator pools
        cache.get(tiny_models["sd1" if i % 2 else "sdxl"], limit=1)
    gc.collect()
    rss0 = proc.memory_info().rss
    for i in range(12):
        cache.get(tiny_models["sd1" if i % 2 else "sdxl"], limit=1)
    gc.collect()
    grown = proc.memory_info().rss - rss0
    size = tiny_models["sdxl"].stat().st_size
    assert cache.evictions >= 16
    assert grown < 3 * size, f"RSS grew {grown / 2**20:.1f} MiB over 12 switches (model file {size / 2**20:.1f} MiB)"


def test_eviction_is_memory_aware_before_a_load(cache, tiny_models):
    cache.get(tiny_models["sd1"], limit=3)
    cache.get(tiny_models["sdxl"], limit=3)
    cache.available_ram = lambda: 0  # no room for another model: drop the oldest first
    cache.get(tiny_models["sd1_inpaint"], limit=3)
    assert [key[0] for key in cache.models] == [str(tiny_models["sd1_inpaint"])]


def test_cached_models_stay_on_the_device_only_while_there_is_room(tmp_path, tiny_models):
    """The automatic policy keeps the previous checkpoint placed while the free memory allows, else sends it
    to RAM (on this CPU-only machine 'the device' is the CPU and the free memory is given)."""
    import torch
    free = {"bytes": 1 << 40}
    policy = DevicePolicy(device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32, mode="auto",
                          free_memory=lambda: free["bytes"])
    c = ModelCache(policy, HashCache(tmp_path / "hashes.json"))
    c.available_ram = lambda: 1 << 40
    sd1 = c.get(tiny_models["sd1"], limit=2)
    sdxl = c.get(tiny_models["sdxl"], limit=2)
    assert sd1.placed and sdxl.placed and policy.mode_for(sdxl) == "resident"
    free["bytes"] = 1 << 20  # now the device is nearly full
    assert c.get(tiny_models["sd1"], limit=2) is sd1
    assert sd1.placed and sdxl.placed is None  # the other one went to RAM, still cached
    assert len(c.models) == 2 and c.loads == 2


def test_turning_cpu_bf16_off_reloads_instead_of_upcasting_rounded_weights(cache, tiny_models):
    import torch
    cache.policy.apply_options({"cpu_bf16": "on"})
    model = cache.get(tiny_models["sd1"], limit=2)
    assert next(model.model.unet.parameters()).dtype == torch.bfloat16
    assert cache.get(tiny_models["sd1"], limit=2) is model and cache.loads == 1
    cache.policy.apply_options({"cpu_bf16": "off"})
    again = cache.get(tiny_models["sd1"], limit=2)
    assert again is not model and cache.loads == 2 and next(again.model.unet.parameters()).dtype == torch.float32
