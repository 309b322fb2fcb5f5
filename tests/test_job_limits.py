"""No request holds the backend hostage: the prompt length and images-per-job limits (settings in "Limits"), and
Interrupt reaching prompt encoding, the hires. fix upscaler (between tiles) and its second pass."""
from __future__ import annotations

import io
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from PIL import Image

from backend.checkpoints import ModelFile
from backend.core.cmd_args import parse_args
from backend.engine.devices import DevicePolicy
from backend.engine.loaded_model import LoadedModel
from backend.core.errors import JobInterrupted
from backend.core.options import SETTINGS
from backend.core.paths import DataPaths
from backend.core.sampler_catalog import resolve_sampling
from backend.engine.pipelines import txt2img
from backend.engine.pipelines.common import JobContext
from backend.engine.postprocess.runtime import DEVICE_PARTS, PostprocessRuntime
from backend.engine.postprocess.upscalers import upscale_for_job
from backend.core.schemas import Txt2ImgRequest
from postprocess_factory import link_models, write_test_models

CPU = torch.device("cpu")


def small(**kw) -> dict:
    body = {"prompt": "a cat", "negative_prompt": "", "steps": 1, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "send_images": True,
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    body.update(kw)
    return body


# -- limits, through the real server -----------------------------------------------------------------------------
def test_a_megabyte_prompt_is_refused_at_once_naming_the_setting(api):
    prompt = ("a photo of a cat, (masterpiece:1.2), [dog:cat:5] " * 30_000)[:1_000_000]
    for field in ("prompt", "negative_prompt", "hr_prompt"):
        t0 = time.monotonic()
        r = api.post("/txt2img", json=small(**{field: prompt}, enable_hr=True))
        elapsed = time.monotonic() - t0
        assert r.status_code == 413, r.text
        assert "prompt_max_chunks" in r.json()["detail"] and "40 chunks" in r.json()["detail"]
        assert elapsed < 15, f"refusing a 1 MB {field} took {elapsed:.1f} s"


def test_the_chunk_limit_is_counted_exactly_in_tokens(api):
    at_limit = "cat " * (40 * 75)  # one token per word: exactly 40 chunks
    r = api.post("/txt2img", json=small(prompt=at_limit))
    assert r.status_code == 200, r.text
    r = api.post("/txt2img", json=small(negative_prompt=at_limit + "cat"))
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "Negative prompt" in detail and "41 chunks" in detail and "prompt_max_chunks" in detail


def test_the_limits_are_settings_a_request_cannot_lift(api):
    r = api.post("/txt2img", json=small(batch_size=2, n_iter=501))
    assert r.status_code == 400, r.text
    assert "1002" in r.json()["detail"] and "max_images_per_job" in r.json()["detail"]
    lifted = small(batch_size=2, n_iter=501, override_settings={"sd_model_checkpoint": "tiny-sd1.safetensors",
                                                                "max_images_per_job": 5000, "prompt_max_chunks": 1000})
    assert api.post("/txt2img", json=lifted).status_code == 400
    r = api.post("/txt2img", json=small(negative_prompt="cat " * 3100, override_settings=lifted["override_settings"]))
    assert r.status_code == 413, r.text
    try:
        assert api.post("/options", json={"max_images_per_job": 2}).status_code == 200
        r = api.post("/txt2img", json=small(n_iter=3))
        assert r.status_code == 400 and "max_images_per_job" in r.json()["detail"]
        assert api.post("/txt2img", json=small(n_iter=2, send_images=False)).status_code == 200
    finally:
        assert api.post("/options", json={"max_images_per_job": 1000}).status_code == 200


def test_interrupt_stops_a_long_prompt_encoding(api, server):
    # Below a raised limit, but with an alternation over 150 steps: 150 different texts of ~90 chunks each to
    # encode before sampling starts (over a minute on a slow CPU without Interrupt reaching the encoder).
    prompt = "a photo of a cat, masterpiece, best quality, " * 600 + "[" + "|".join(f"w{i}" for i in range(150)) + "]"
    result = {}

    def run():
        result["r"] = httpx.post(server.url + "/sdapi/v1/txt2img", json=small(prompt=prompt, steps=150), timeout=600)

    assert api.post("/options", json={"prompt_max_chunks": 1000}).status_code == 200
    try:
        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and api.get("/progress").json()["current_task"] is None:
            time.sleep(0.05)
        assert api.get("/progress").json()["current_task"] is not None, "the job never started"
        t0 = time.monotonic()
        assert api.post("/interrupt").status_code == 200
        t.join(120)
        stopped_in = time.monotonic() - t0
        assert not t.is_alive(), "Interrupt did not stop the prompt encoding"
    finally:
        assert api.post("/options", json={"prompt_max_chunks": 40}).status_code == 200
    r = result["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True
    assert r.json()["images"] == []  # stopped before any picture was sampled
    assert stopped_in < 20, f"the job ran on for {stopped_in:.1f} s after Interrupt"


# -- Interrupt in the upscaler and hires. fix, run directly ------------------------------------------------------
@pytest.fixture(scope="module")
def sr_files(tmp_path_factory):
    return write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("compact",))


@pytest.fixture()
def runtime(tmp_path, sr_files) -> PostprocessRuntime:
    paths = DataPaths.from_args(parse_args(["--data-dir", str(tmp_path)]))
    paths.ensure_folders()
    link_models(sr_files, paths.models_dir)
    return PostprocessRuntime(paths, policies={part: DevicePolicy(device=CPU, dtype=torch.float32,
                                                                  vae_dtype=torch.float32) for part in DEVICE_PARTS})


class Control:
    """A JobControl whose Interrupt is pressed once `press_when()` is true; counts the checks and sampling steps."""

    def __init__(self, press_when=lambda control: False):
        self.press_when = press_when
        self.pressed = False
        self.checks = 0
        self.steps = 0

    def interrupted(self) -> bool:
        self.checks += 1
        self.pressed = self.pressed or self.press_when(self)
        return self.pressed

    def skipped(self) -> bool:
        return False

    def clear_skip(self) -> None:
        pass

    def begin(self, job_count: int, total_steps: int) -> None:
        pass

    def set_job(self, job_no: int) -> None:
        pass

    def step(self, preview) -> None:
        self.steps += 1


def test_interrupt_stops_an_upscale_between_its_tiles(runtime):
    control = Control(lambda c: c.checks >= 3)
    options = {s.key: s.default for s in SETTINGS}
    options.update({"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4})
    ctx = SimpleNamespace(control=control, postprocess=runtime, options=options)
    image = Image.new("RGB", (128, 128), (90, 140, 30))  # 8 x 8 = 64 tiles of 16 px
    with pytest.raises(JobInterrupted):
        upscale_for_job(ctx, image, "R-ESRGAN General 4xV3", 512, 512)
    assert control.checks == 3  # it stopped at the third tile, not after the 64th


def test_interrupt_during_the_hires_upscale_returns_the_first_pass(sd1, tiny_models, runtime, tmp_path):
    loaded = LoadedModel(sd1)
    DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32).place(loaded)
    loads = []
    load = runtime.load_upscaler
    runtime.load_upscaler = lambda up: loads.append(up.name) or load(up)
    control = Control(lambda c: bool(loads))  # pressed once the upscaler model is loaded: before its first tile
    options = {s.key: s.default for s in SETTINGS}
    options.update({"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4, "live_previews_enable": False, "samples_save": False})
    ckpt = tiny_models["sd1"]
    req = Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64, seed=3, sampler_name="Euler", enable_hr=True,
                         hr_scale=4, hr_upscaler="R-ESRGAN General 4xV3", hr_second_pass_steps=2,
                         denoising_strength=0.5, do_not_save_samples=True, do_not_save_grid=True)
    ctx = JobContext(loaded=loaded, policy=DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32),
                     options=options, outputs_root=tmp_path, checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64),
                     vae=None, control=control, postprocess=runtime,
                     sampling=resolve_sampling(req, options["default_sampler"]))
    result = txt2img.run(req, ctx)
    assert loads == ["R-ESRGAN General 4xV3"]
    assert result.interrupted
    assert control.steps == 2  # the first pass ran; the second pass never started
    [image] = result.images
    assert Image.open(io.BytesIO(image.png)).size == (64, 64)  # the first pass's picture



def test_interrupt_between_faces_keeps_the_rest_as_they_were(tmp_path_factory, tmp_path):
    import numpy as np
    import skimage.data

    from backend.engine.postprocess.face_restore import restore_faces_for_job

    files = write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("gfpgan",))
    paths = DataPaths.from_args(parse_args(["--data-dir", str(tmp_path)]))
    paths.ensure_folders()
    link_models(files, paths.models_dir)
    runtime = PostprocessRuntime(paths, policies={part: DevicePolicy(device=CPU, dtype=torch.float32,
                                                                     vae_dtype=torch.float32) for part in DEVICE_PARTS})
    astronaut = Image.fromarray(skimage.data.astronaut())  # one face each
    control = Control(lambda c: c.checks >= 2)  # pressed while the first image's face is restored
    ctx = SimpleNamespace(control=control, postprocess=runtime, warnings=[], extra_params={},
                          options={"face_restoration_model": "GFPGAN", "face_detector": "OpenCV Haar cascade"})
    first, second = restore_faces_for_job(ctx, [astronaut, astronaut.copy()])
    assert not np.array_equal(np.asarray(first), np.asarray(astronaut))  # restored before Interrupt
    assert np.array_equal(np.asarray(second), np.asarray(astronaut))  # kept as it was
    assert control.checks == 2


def test_interrupt_between_controlnet_units(sd1, tiny_models, tmp_path):
    from controlnet_factory import write_tiny_controlnet

    from backend.controlnet.units import UnitJob
    from backend.engine.controlnet.runtime import ControlNetCache, prepare_controls
    from backend.controlnet.units import ControlUnit

    policy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32)
    loaded = LoadedModel(sd1)
    policy.place(loaded)
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    write_tiny_controlnet(path, "sd1", seed=11)
    image = Image.new("RGB", (64, 64), "black")
    units = [UnitJob(ControlUnit(model=path.stem, module="canny", image=image, processor_res=64), str(path),
                     f"{path.stem} [00000000]") for _ in range(3)]
    control = Control(lambda c: c.checks >= 2)  # pressed while the first unit is prepared
    ckpt = tiny_models["sd1"]
    ctx = JobContext(loaded=loaded, policy=policy, options={s.key: s.default for s in SETTINGS}, outputs_root=tmp_path,
                     checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=control)
    with pytest.raises(JobInterrupted):
        prepare_controls(units, ctx, ControlNetCache(policy), width=64, height=64)
    assert control.checks == 2 and "ControlNet 1" not in ctx.extra_params
