"""Restore faces in img2img, run directly with the tiny SD1 checkpoint: the restorer runs on the decoded image before
the inpainting overlay (pixels outside the mask never change), is recorded in the infotext, and a missing face model
is a warning, not a failure."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageOps

import backend.downloads
from backend.core.cmd_args import parse_args
from backend.engine.devices import DevicePolicy
from backend.core.infotext import parse_infotext
from backend.core.paths import DataPaths
from backend.core.sampler_catalog import resolve_sampling
from backend.engine.pipelines import img2img
from backend.engine.postprocess.runtime import DEVICE_PARTS, PostprocessRuntime
from backend.core.schemas import Img2ImgRequest
from postprocess_factory import link_models, write_test_models
from test_api_img2img import box_mask, picture
from test_img2img_sd_upscale import RecordingControl, context, placed_sd1  # noqa: F401 (fixture)

HAAR = "OpenCV Haar cascade"
CPU = torch.device("cpu")
BOX = (16, 16, 40, 40)


def runtime_for(data_dir, files: dict) -> PostprocessRuntime:
    paths = DataPaths.from_args(parse_args(["--data-dir", str(data_dir)]))
    paths.ensure_folders()
    link_models(files, paths.models_dir)
    return PostprocessRuntime(paths, policies={part: DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32)
                                               for part in DEVICE_PARTS})


def job(model, ckpt, tmp_path, runtime, **options):
    ctx = context(model, ckpt, tmp_path, RecordingControl())
    return replace(ctx, postprocess=runtime, options={**ctx.options, **options},
                   sampling=resolve_sampling(request(), ctx.options["default_sampler"]))


def request(**kw) -> Img2ImgRequest:
    return Img2ImgRequest(**{"prompt": "a portrait", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler",
                             "seed": 11, "denoising_strength": 0.6, "restore_faces": True, "mask_blur": 0, **kw})


def outside(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB"), dtype=np.int16).copy()
    a[BOX[1] - 2:BOX[3] + 3, BOX[0] - 2:BOX[2] + 3] = 0
    return a


def decoded(result) -> Image.Image:
    import io
    return Image.open(io.BytesIO(result.images[0].png)).convert("RGB")


def test_restore_faces_runs_before_the_overlay(placed_sd1, tiny_models, tmp_path, monkeypatch):
    calls = []

    def invert(ctx, images):  # a "restorer" that changes every pixel, to see where its output lands
        calls.append(len(images))
        ctx.extra_params["Face restoration"] = "Inverted"
        return [ImageOps.invert(im) for im in images]

    monkeypatch.setattr(img2img, "restore_faces_for_job", invert)
    init = picture(64, 64)
    ctx = job(placed_sd1, tiny_models["sd1"], tmp_path, None)
    result = img2img.run(request(), ctx, [init], box_mask(64, 64, BOX))
    out = decoded(result)
    assert calls == [1] and "Face restoration: Inverted" in result.images[0].infotext
    assert np.array_equal(outside(out), outside(init))  # the overlay keeps the unmasked pixels, restored or not
    inside = np.asarray(out, dtype=np.int16)[BOX[1] + 2:BOX[3] - 2, BOX[0] + 2:BOX[2] - 2]
    plain = decoded(img2img.run(request(restore_faces=False), job(placed_sd1, tiny_models["sd1"], tmp_path, None),
                                [init], box_mask(64, 64, BOX)))
    assert np.abs(inside - np.asarray(plain, dtype=np.int16)[BOX[1] + 2:BOX[3] - 2, BOX[0] + 2:BOX[2] - 2]).mean() > 50


def test_restore_faces_with_a_model_records_it(placed_sd1, tiny_models, tmp_path, tmp_path_factory):
    files = write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("gfpgan",))
    runtime = runtime_for(tmp_path / "data", files)
    ctx = job(placed_sd1, tiny_models["sd1"], tmp_path, runtime, face_restoration_model="GFPGAN", face_detector=HAAR)
    init = picture(64, 64)
    result = img2img.run(request(), ctx, [init], box_mask(64, 64, BOX))
    assert parse_infotext(result.images[0].infotext)["Face restoration"] == "GFPGAN"
    assert result.info["restore_faces"] is True and not result.warnings
    assert np.array_equal(outside(decoded(result)), outside(init))


def test_missing_face_model_is_a_warning_and_the_image_is_kept(placed_sd1, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    ctx = job(placed_sd1, tiny_models["sd1"], tmp_path, runtime_for(tmp_path / "data", {}),
              face_restoration_model="CodeFormer", face_detector=HAAR)
    result = img2img.run(request(), ctx, [picture(64, 64)], None)
    assert len(result.images) == 1 and decoded(result).size == (64, 64)
    assert any("Face restoration skipped" in w and "No CodeFormer model found" in w for w in result.warnings)
    assert "Face restoration" not in result.images[0].infotext
