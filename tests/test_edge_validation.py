"""Validate once, at the edge: the app process checks a generation request and resolves its sampler names
(`backend.core.request_checks`, `sampler_catalog.resolve_sampling` in `backend.service`); the engine runs what it
receives without checking or resolving again, and reads settings through `JobOptions`, whose defaults are the
ones `backend.core.options.SETTINGS` declares (written once)."""
from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.checkpoints import ModelFile
from backend.core import request_checks, sampler_catalog
from backend.core.errors import UserError
from backend.core.job_options import JobOptions
from backend.core.options import SETTINGS, SETTINGS_BY_KEY
from backend.core.sampler_catalog import SamplingChoice, find_sampler, resolve_sampling
from backend.core.schemas import Txt2ImgRequest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "backend" / "engine"
EDGE_ONLY = {"check_txt2img", "check_img2img", "check_img2img_inputs", "validate_generation", "validate_seeds",
             "check_prompt_text", "resolve_sampler", "resolve_sampling"}


# -- the service resolves, once -------------------------------------------------------------------------------
@pytest.fixture()
def service(tmp_path):
    from backend.core.cmd_args import parse_args
    from backend.service import EaselService

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # the job payload names a checkpoint; none is loaded here
    return EaselService(parse_args(["--data-dir", str(tmp_path), "--no-download-sd-model"]))  # no backend started


def count_resolutions(monkeypatch) -> list:
    calls = []
    resolve = sampler_catalog.resolve_sampling
    monkeypatch.setattr(sampler_catalog, "resolve_sampling", lambda *a, **kw: calls.append(a) or resolve(*a, **kw))
    return calls


def test_the_service_resolves_the_samplers_once_and_sends_them(service, monkeypatch):
    calls = count_resolutions(monkeypatch)
    req = Txt2ImgRequest(prompt="x", sampler_name="DPM++ 2M Karras", enable_hr=True, hr_sampler_name="euler")
    payload = service._job_payload(req)
    assert len(calls) == 1
    assert payload["sampling"] == SamplingChoice(find_sampler("DPM++ 2M"), "Karras", find_sampler("Euler"), "Karras")
    # the job's own default_sampler (override_settings, merged into its options) names the sampler when none is asked
    payload = service._job_payload(Txt2ImgRequest(prompt="x", override_settings={"default_sampler": "DDIM"}))
    assert len(calls) == 2 and payload["sampling"].sampler.name == "DDIM" and payload["options"]["default_sampler"] == "DDIM"
    assert payload["sampling"].hires_sampler.name == "DDIM"  # no hires sampler asked: the first pass's


def test_bad_values_are_refused_at_the_edge(service):
    with pytest.raises(UserError, match="Unknown sampler 'Nope'"):
        service._job_payload(Txt2ImgRequest(prompt="x", enable_hr=True, hr_sampler_name="Nope"))
    with pytest.raises(UserError, match="Unknown schedule type 'Sideways'"):
        service._job_payload(Txt2ImgRequest(prompt="x", scheduler="Sideways"))
    with pytest.raises(UserError, match="cfg_scale must be between 0 and 100"):
        service._job_payload(Txt2ImgRequest(prompt="x", cfg_scale=150))
    # unbalanced brackets are accepted as A1111 accepts them (issue 14 turned this refusal into acceptance)
    payload = service._job_payload(Txt2ImgRequest(prompt="x", enable_hr=True, hr_negative_prompt="a (cat"))
    assert payload["request"].hr_negative_prompt == "a (cat"
    assert service._job_payload(Txt2ImgRequest(prompt="<lora:a(b):1> x", hr_prompt="a (cat"))


# -- the engine trusts what it receives -----------------------------------------------------------------------
# Requests an AUTOMATIC1111 script builds inside the backend (its `p` after `run`) were never seen by the edge:
# the one module that turns them into requests checks them where they are made, with the edge's own checks.
FIRST_MADE_IN_THE_ENGINE = ("a1111_bridge.py",)


def test_no_engine_module_checks_or_resolves_a_request_again():
    found = []
    for path in sorted(p for p in ENGINE.rglob("*.py") if p.name not in FIRST_MADE_IN_THE_ENGINE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute)
                     else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in EDGE_ONLY]
    assert found == []


def test_the_pipeline_runs_the_sampling_it_is_given_and_checks_nothing_again(tiny_models, monkeypatch):
    from backend.engine.devices import DevicePolicy
    from backend.engine.model_loader import load_sd_model
    from backend.engine.pipelines import txt2img
    from backend.engine.pipelines.common import JobContext, StepClock

    def refuse(*a, **kw):
        raise AssertionError("the engine checked or resolved the request again")

    for name in ("check_txt2img", "validate_generation", "validate_size", "validate_seeds"):
        monkeypatch.setattr(request_checks, name, refuse)
    monkeypatch.setattr(sampler_catalog, "resolve_sampler", refuse)
    monkeypatch.setattr(sampler_catalog, "resolve_sampling", refuse)
    from backend.engine.loaded_model import LoadedModel
    model = LoadedModel(load_sd_model(tiny_models["sd1"]))
    policy = DevicePolicy(device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32)
    policy.place(model)
    ckpt = tiny_models["sd1"]
    # The request names Euler a and a cfg_scale the edge refuses; what the app resolved (Euler, Karras) is what runs.
    req = Txt2ImgRequest(prompt="a house", steps=2, width=64, height=64, seed=1, sampler_name="Euler a", cfg_scale=150,
                         do_not_save_samples=True, do_not_save_grid=True)
    sampling = SamplingChoice(find_sampler("Euler"), "Karras", find_sampler("Euler"), "Karras")
    ctx = JobContext(loaded=model, policy=policy, options={}, outputs_root=ckpt.parent,
                     checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=StepClock(),
                     sampling=sampling)
    result = txt2img.run(req, ctx)
    assert result.info["sampler_name"] == "Euler" and result.info["scheduler"] == "Karras"
    assert "Sampler: Euler, Schedule type: Karras" in result.images[0].infotext
    assert np.asarray(Image.open(io.BytesIO(result.images[0].png))).std() > 0


def test_a_pipeline_without_its_resolved_sampling_says_so(tiny_models):
    from backend.engine.pipelines.common import JobContext, StepClock
    from backend.engine.pipelines.processing import Generation

    ctx = JobContext(loaded=None, policy=None, options={}, outputs_root=Path("."), checkpoint=None, vae=None,
                     control=StepClock())
    with pytest.raises(ValueError, match="JobContext.sampling is not set: .*resolve_sampling"):
        Generation(Txt2ImgRequest(prompt="x"), ctx, samples_dir_key="outdir_txt2img_samples",
                   grids_dir_key="outdir_txt2img_grids")


# -- settings: each default written once ------------------------------------------------------------------------
def test_job_options_read_the_declared_defaults():
    options = JobOptions({"samples_format": "webp", "not_a_setting": 1})
    assert options["samples_format"] == "webp" and options["not_a_setting"] == 1
    for setting in SETTINGS:
        if setting.key != "samples_format":
            assert options[setting.key] == setting.default
    with pytest.raises(KeyError):
        options["samples_fromat"]  # a typo is an error, not a silent default
    assert set(options) == set(SETTINGS_BY_KEY) | {"not_a_setting"} and len(options) == len(SETTINGS) + 1
    with pytest.raises(TypeError):
        options["samples_format"] = "png"  # read-only
    assert JobOptions.of(options) is options


def test_the_job_context_reads_settings_with_their_defaults():
    from backend.engine.pipelines.common import JobContext, StepClock

    ctx = JobContext(loaded=None, policy=None, options={"eta_ddim": 0.25}, outputs_root=Path("."), checkpoint=None,
                     vae=None, control=StepClock())
    assert isinstance(ctx.options, JobOptions)
    assert ctx.options["eta_ddim"] == 0.25 and ctx.options["eta_ancestral"] == SETTINGS_BY_KEY["eta_ancestral"].default


def test_no_setting_default_is_written_again_where_settings_are_read():
    """`options.get("<a declared setting>", <a literal default>)` repeats a default `SETTINGS` declares."""
    found = []
    for path in sorted(p for folder in ("backend", "api", "ui") for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in SETTINGS_BY_KEY
                    and isinstance(node.args[1], (ast.Constant, ast.Name))):
                found.append((str(path.relative_to(ROOT)), node.args[0].value))
    assert found == []
