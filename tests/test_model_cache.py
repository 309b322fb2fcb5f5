"""The backend's checkpoint cache: switching back to a cached checkpoint reads no file; the limit evicts."""
from __future__ import annotations

import argparse

import pytest

from backend import model_loader
from backend.checkpoints import HashCache
from backend.cmd_args import parse_args
from backend.devices import DevicePolicy
from backend.worker import ModelCache


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
    c.reads = reads
    return c


def test_switching_back_to_a_cached_checkpoint_reads_no_file(cache, tiny_models):
    sd1 = cache.get(tiny_models["sd1"], limit=2)
    sdxl = cache.get(tiny_models["sdxl"], limit=2)
    assert (sd1.family, sdxl.family) == ("sd1", "sdxl")
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
