"""Always-on scripts' two registries: the app's (backend/always_on_scripts.py) parses a request's `alwayson_scripts`
by name and leaves the rest in the request; the engine's (backend/engine/always_on.py) turns a job's payload into
the `ScriptJob` its scripts see and their hooks into the job's `sampling_hooks`."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
from PIL import Image

from backend.always_on_scripts import AlwaysOnScripts
from backend.core.errors import UserError
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest


class Doubler:
    name = "Doubler"

    def for_job(self, entry, *, img2img):
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if any(not isinstance(a, int) for a in args):
            raise UserError("doubler: args must be integers")
        return [2 * a for a in args if a] or None


def test_app_registry_parses_its_scripts_and_leaves_the_others_in_the_request():
    registry = AlwaysOnScripts([Doubler()])
    parsed, rest = registry.for_job({" doubler ": {"args": [1, 2]}, "soft inpainting": {"args": [True]}}, img2img=True)
    assert parsed == {"doubler": [2, 4]}
    assert rest == {"soft inpainting": {"args": [True]}}
    # nothing to do (None): the entry stays in the request as it came
    parsed, rest = registry.for_job({"DOUBLER": {"args": [0]}}, img2img=False)
    assert parsed == {} and rest == {"DOUBLER": {"args": [0]}}
    assert registry.for_job(None, img2img=False) == ({}, {})
    with pytest.raises(UserError, match="must be integers"):
        registry.for_job({"doubler": {"args": ["x"]}}, img2img=False)


def test_engine_script_job_and_hooks(monkeypatch):
    from backend.engine import always_on
    from backend.engine.sampling_hooks import SamplingHook

    hook = SamplingHook()
    seen = {}
    made = []
    fake = types.SimpleNamespace(
        prepare=lambda args, job, ctx, resources: (
            seen.update(args=args, job=job, resources=resources) or ([hook], [b"png"])),
        runtime=lambda policy, models_dir: made.append((policy, models_dir)) or {"cache": len(made)},
        detect=lambda payload, runtime: {"payload": payload, "runtime": runtime})
    monkeypatch.setitem(always_on.ENGINE_SCRIPTS, "doubler", "fake_script_module")
    monkeypatch.setattr(always_on.importlib, "import_module", lambda name: fake if name == "fake_script_module" else None)

    req = Txt2ImgRequest(prompt="x", width=64, height=96, seed=-1, enable_hr=True, hr_scale=2)
    job = always_on.script_job("txt2img", {"request": req})
    assert (job.width, job.height, job.hires_size, job.seed, job.init_image) == (64, 96, (128, 192), 0, None)

    picture, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 0)
    inverted = Img2ImgRequest(prompt="x", width=64, height=64, seed=5, inpainting_mask_invert=1)
    job = always_on.script_job("img2img", {"request": inverted, "init_images": [picture], "mask": mask})
    assert job.init_image is picture and job.hires_size is None and job.seed == 5
    assert job.init_mask.getextrema() == (255, 255)  # "Inpaint not masked": the scripts see the area repainted

    ctx = types.SimpleNamespace(sampling_hooks=[])
    runtimes = always_on.ScriptRuntimes("policy", "models")
    images = always_on.prepare_scripts({"doubler": [2, 4]}, job, ctx, runtimes)
    assert images == [b"png"] and ctx.sampling_hooks == [hook]
    assert seen["args"] == [2, 4] and seen["job"] is job and seen["resources"] == {"cache": 1}
    # The script's runtime is made once, on first use, and kept between jobs.
    always_on.prepare_scripts({"doubler": [1]}, job, ctx, runtimes)
    assert made == [("policy", Path("models"))] and seen["resources"] is runtimes.get("doubler")
    # A job kind the script adds runs its function with the payload and the same runtime.
    monkeypatch.setitem(always_on.SCRIPT_JOBS, "doubler_detect", ("doubler", "detect"))
    assert always_on.run_script_job("doubler_detect", {"x": 1}, runtimes) == {"payload": {"x": 1}, "runtime": {"cache": 1}}
    with pytest.raises(ValueError, match="no engine component"):
        always_on.prepare_scripts({"unknown": []}, job, ctx, {})
