"""Model files read without torch (`backend.core.tensor_headers`): what the app lists files by.

The files are written with torch here; the reader must give the same names, shapes and dtypes torch reads,
build nothing but plain data from a pickle, and refuse (without running) anything else.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backend.core.errors import UserError
from backend.core.tensor_headers import TensorHeader, read_pickle_headers, read_shapes


def _tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.zeros(4, 3, 2, 2), "b.bias": torch.ones(7, dtype=torch.float16),
            "c": torch.zeros(2, 5, dtype=torch.bfloat16), "d": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def _expected(tensors: dict[str, torch.Tensor]) -> dict[str, TensorHeader]:
    return {k: TensorHeader(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_shapes_and_dtypes_match_what_torch_reads(tmp_path, fmt):
    tensors = _tensors()
    if fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "m.ckpt"
        torch.save({"state_dict": tensors, "global_step": np.int64(1000), "epoch": 3}, path,
                   _use_new_zipfile_serialization=fmt == "zip")
    shapes = read_shapes(path)
    assert shapes == _expected(tensors)
    assert shapes["a.weight"].ndim == 4 and shapes["b.bias"].is_floating_point() and not shapes["d"].is_floating_point()


def test_plain_values_and_parameters_are_kept(tmp_path):
    path = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.zeros(3, 8))}, "name": "x", "step": 1500}, path)
    data = read_pickle_headers(path)
    assert data["name"] == "x" and data["step"] == 1500
    assert data["string_to_param"]["*"] == TensorHeader((3, 8), "float32")


def test_a_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(UserError, match="evil.pt contains Python objects .*system"):
        read_shapes(path)
    assert not marker.exists()


def test_damaged_files_are_user_errors_naming_them(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="junk.pth"):
        read_shapes(tmp_path / "junk.pth")
    good = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(64, 64)}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.pt"):
        read_shapes(tmp_path / "cut.pt")
    (tmp_path / "short.safetensors").write_bytes(b"1234")
    with pytest.raises(UserError, match="short.safetensors"):
        read_shapes(tmp_path / "short.safetensors")
    with pytest.raises(UserError, match="not found"):
        read_shapes(tmp_path / "missing.pt")
