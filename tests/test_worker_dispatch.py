"""The backend's job dispatch (`backend.engine.worker`): one typed handler per job kind in `JOB_HANDLERS`, a typed
`WorkerState` and `JobContext`, and a clear error for a kind the backend does not run."""
from __future__ import annotations

import ast
import re
import sys
import types
import typing
from collections import OrderedDict
from pathlib import Path

import pytest

from backend.engine import worker
from backend.engine.pipelines import common

ROOT = Path(__file__).resolve().parents[1]


def submitted_kinds() -> set[str]:
    """The job kinds the app process's code submits (`client.submit("kind", ...)`)."""
    files = [ROOT / "app.py"] + [p for folder in ("backend", "api", "ui") for p in (ROOT / folder).rglob("*.py")]
    kinds: set[str] = set()
    for path in files:
        if "engine" not in path.relative_to(ROOT).parts:
            kinds |= set(re.findall(r'\.submit\(\s*"([a-z0-9_]+)"', path.read_text(encoding="utf-8")))
    return kinds


def test_every_kind_the_app_sends_has_a_handler():
    kinds = submitted_kinds()
    assert {"txt2img", "img2img", "img2img_batch", "load", "unload", "memory", "extras", "controlnet_detect"} <= kinds
    assert kinds <= set(worker.JOB_HANDLERS), kinds - set(worker.JOB_HANDLERS)
    assert all(callable(handler) for handler in worker.JOB_HANDLERS.values())


def test_an_unknown_kind_is_a_clear_error():
    state = worker.WorkerState(policy=None, hashes=None, cache=None, vae=None)
    with pytest.raises(ValueError, match=r"unknown job kind 'paint'; the backend runs: memory, unload, .*txt2img"):
        worker.run_job("paint", {}, state, common.StepClock())


class Recorder:
    def __init__(self):
        self.cleared = 0
        self.loads = 3
        self.models = OrderedDict({("/models/a.safetensors", 10, 1.0): None, ("/models/sub/b.ckpt", 20, 2.0): None})

    def clear(self) -> None:
        self.cleared += 1


def test_jobs_without_a_model_run_through_the_table():
    import torch

    cache, scripts, postprocess = Recorder(), Recorder(), Recorder()
    state = worker.WorkerState(policy=types.SimpleNamespace(device=torch.device("cpu")), hashes=None, cache=cache,
                               vae=None, scripts=scripts, postprocess=postprocess)
    control = common.StepClock()
    assert worker.run_job("cache_info", {}, state, control) == {"loads": 3, "cached": ["a.safetensors", "b.ckpt"]}
    assert worker.run_job("unload", {}, state, control) == {"ok": True}
    assert (cache.cleared, scripts.cleared, postprocess.cleared) == (1, 1, 1)
    report = worker.run_job("memory", {}, state, control)
    assert report["ram"]["total"] > 0 and set(report) == {"ram", "cuda"}


def type_checking_names(module) -> dict:
    """The names a module imports under `if TYPE_CHECKING:` (its annotations' types), imported here."""
    names: dict = {}
    for node in ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec"), names)
    return names


def hints_of(obj) -> dict:
    module = sys.modules[obj.__module__]
    return typing.get_type_hints(obj, globalns=vars(module), localns=type_checking_names(module))


def loose(hint) -> bool:
    """`object` or `object | None`: a field whose type says nothing."""
    if hint is object:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return object in typing.get_args(hint)
    return False


@pytest.mark.parametrize("cls", [common.JobContext, worker.WorkerState, worker.JobModel, worker.GenerationPayload])
def test_the_job_context_and_the_worker_state_are_typed(cls):
    hints = hints_of(cls)  # every annotation resolves to a real class (a renamed one would fail here)
    assert hints and not [name for name, hint in hints.items() if loose(hint)]


def test_every_handler_takes_the_typed_state():
    for kind, handler in worker.JOB_HANDLERS.items():
        hints = hints_of(handler)
        assert hints["state"] is worker.WorkerState, kind
        assert "payload" in hints and "control" in hints and "return" in hints, kind


def test_a_script_cell_runs_with_the_model_files_the_app_resolved_for_it():
    """X/Y/Z plot's model axes: a cell's (checkpoint, VAE) setting picks the files the app sent; with no checkpoint
    chosen (a VAE axis) and an automatic checkpoint, the pair of the checkpoint the job loaded; else the job's own."""
    from backend.checkpoints import ModelFile

    a, b = ModelFile("a.safetensors", Path("/m/a.safetensors")), ModelFile("b.safetensors", Path("/m/b.safetensors"))
    vae, vae_b = ModelFile("v.pt", Path("/m/VAE/v.pt")), ModelFile("b.vae.pt", Path("/m/b.vae.pt"))
    job = worker.JobModel(model=None, checkpoint=b, vae=vae_b, notes=[], unloadable={})
    table = {("a.safetensors [1]", None): [(a, None)], (None, "v.pt"): [(a, vae), (b, vae)]}
    assert worker._cell_model_files(table, {"sd_model_checkpoint": "a.safetensors [1]"}, job) == (a, None)
    assert worker._cell_model_files(table, {"sd_vae": "v.pt"}, job) == (b, vae)  # the job fell back to b
    assert worker._cell_model_files(table, {"CLIP_stop_at_last_layers": 2}, job) == (b, vae_b)
