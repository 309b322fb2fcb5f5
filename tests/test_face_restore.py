"""Face detection, alignment and restoration on a real photograph (scikit-image's astronaut), with GFPGANv1.4- and
CodeFormer-shaped random-weight models written as the released files."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from backend.core.cmd_args import parse_args
from backend.engine.devices import DevicePolicy
from backend.core.errors import UserError
from backend.core.paths import DataPaths
from backend.engine.postprocess import extras
from backend.engine.postprocess import face_detection as fd, face_restore as fr
from backend.engine.postprocess.model_files import LoadedModel, load_model
from backend.engine.postprocess.runtime import DEVICE_PARTS, PostprocessRuntime
from backend.postprocess.schemas import ExtrasRequest
from postprocess_factory import link_models, write_test_models

torch.set_num_threads(1)
HAAR = "OpenCV Haar cascade"
# Where Eileen Collins' face is in skimage.data.astronaut() (512x512): forehead to chin, ear to ear.
FACE_REGION = (165, 55, 285, 185)


@pytest.fixture(scope="session")
def face_files(tmp_path_factory):
    return write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("gfpgan", "codeformer"))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    import skimage.data
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def haar():
    return fd.HaarCascadeDetector()


def loaded(path, kind) -> LoadedModel:
    return LoadedModel(load_model(path, kind), path, kind, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def gfpgan(face_files):
    return loaded(face_files["gfpgan"], "gfpgan")


@pytest.fixture(scope="module")
def gfpgan_result(gfpgan, haar, astronaut):
    return fr.restore_faces(astronaut, gfpgan, haar)


def test_haar_detector_finds_the_face_where_it_is(haar, astronaut):
    faces = haar.detect(np.asarray(astronaut))
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    fx1, fy1, fx2, fy2 = FACE_REGION
    assert fx1 <= x1 < x2 <= fx2 and fy1 <= y1 < y2 <= fy2
    left_eye, right_eye, nose, mouth_l, mouth_r = faces[0].landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_l[0] < mouth_r[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1]) < y2
    # the eyes were found by the eye cascade: at her eyes (about (200, 103) and (245, 106) in the photograph)
    assert np.linalg.norm(left_eye - (201, 103)) < 8 and np.linalg.norm(right_eye - (245, 104)) < 8


def test_alignment_maps_the_landmarks_onto_the_ffhq_template(haar, astronaut):
    face = haar.detect(np.asarray(astronaut))[0]
    crop, matrix = fd.align_face(np.asarray(astronaut), face)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    mapped = np.c_[face.landmarks, np.ones(5)] @ matrix.T
    assert np.abs(mapped - fd.FFHQ_TEMPLATE_512).max() < 3
    # the face fills the crop as in FFHQ: skin tones around the template's nose, not the grey padding
    r, g, b = crop[300:330, 240:270].reshape(-1, 3).mean(0)
    assert r > g > b and r > 120


def test_automatic_detector_offline_without_weights_uses_haar_and_says_so(tmp_path, monkeypatch, caplog):
    import backend.downloads
    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    detectors = fd.FaceDetectors(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="easel.postprocess"):
        detector = detectors.get("Automatic")
    assert isinstance(detector, fd.HaarCascadeDetector)
    assert "face detection: OpenCV Haar cascade (offline fallback" in caplog.text
    with pytest.raises(UserError, match="detection_Resnet50_Final.pth.*no internet connection"):
        detectors.get("RetinaFace")
    assert isinstance(detectors.get(HAAR), fd.HaarCascadeDetector)


def test_retinaface_weights_in_models_are_used(tmp_path, astronaut, caplog):
    """facexlib's RetinaFace is built and loaded from models/facexlib (here with random weights, as the released
    file's layout: a plain state dict with DataParallel's `module.` prefix)."""
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(0)
    net = RetinaFace(network_name="resnet50", half=False, device=torch.device("cpu"))
    weights = tmp_path / "models" / "facexlib" / fd.RETINAFACE_FILE
    weights.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, weights)
    detectors = fd.FaceDetectors(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="easel.postprocess"):
        detector = detectors.get("Automatic")
    assert isinstance(detector, fd.RetinaFaceDetector)
    assert "face detection: RetinaFace (ResNet-50)" in caplog.text
    found = detector.detect(np.asarray(astronaut))
    assert all(f.landmarks.shape == (5, 2) for f in found)
    weights.write_bytes(b"damaged")
    with pytest.raises(UserError, match="RetinaFace weights"):
        fd.FaceDetectors(tmp_path / "models").get("RetinaFace")


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2) > 0


def test_gfpgan_restores_the_face_and_nothing_else(gfpgan_result, astronaut, haar):
    assert gfpgan_result.faces == 1 and not gfpgan_result.notes
    changed = _changed(astronaut, gfpgan_result.image)
    ys, xs = np.nonzero(changed)
    # every changed pixel lies inside the face's aligned square, warped back into the photograph
    face = haar.detect(np.asarray(astronaut))[0]
    inverse = np.linalg.inv(np.vstack([fd.alignment_matrix(face.landmarks), [0, 0, 1]]))
    corners = (inverse @ np.array([[0, 0, 1], [512, 0, 1], [0, 512, 1], [512, 512, 1]]).T).T[:, :2]
    assert corners[:, 0].min() - 1 <= xs.min() and xs.max() <= corners[:, 0].max() + 1
    assert corners[:, 1].min() - 1 <= ys.min() and ys.max() <= corners[:, 1].max() + 1
    # far from the face nothing moved: the suit, the flag, the shuttle
    assert not changed[300:].any() and not changed[:, :120].any() and not changed[:, 360:].any()
    # and the face itself did change (random weights: a very different face)
    fx1, fy1, fx2, fy2 = FACE_REGION
    assert changed[fy1 + 30:fy2 - 30, fx1 + 30:fx2 - 30].mean() > 0.9


def test_image_without_a_face_comes_back_unchanged_with_a_note(gfpgan, haar):
    ramp = Image.linear_gradient("L").resize((200, 160)).convert("RGB")
    outcome = fr.restore_faces(ramp, gfpgan, haar)
    assert outcome.faces == 0 and outcome.notes == [fr.NO_FACE_NOTE]
    assert np.array_equal(np.asarray(outcome.image), np.asarray(ramp))


def test_codeformer_restores_the_face_and_nothing_else(face_files, astronaut, haar):
    model = loaded(face_files["codeformer"], "codeformer")
    assert model.architecture == "CodeFormer"
    outcome = fr.restore_faces(astronaut, model, haar, codeformer_weight=0.5)
    assert outcome.faces == 1
    changed = _changed(astronaut, outcome.image)
    assert not changed[300:].any() and not changed[:, :120].any() and not changed[:, 360:].any()
    fx1, fy1, fx2, fy2 = FACE_REGION
    assert changed[fy1 + 30:fy2 - 30, fx1 + 30:fx2 - 30].mean() > 0.9


def test_wrong_model_kinds_are_named(face_files):
    with pytest.raises(UserError, match="GFPGANv1.4.pth is a face restoration model.*not an upscaler"):
        load_model(face_files["gfpgan"], "upscaler")
    with pytest.raises(UserError, match="codeformer-v0.1.0.pth is not a GFPGAN"):
        load_model(face_files["codeformer"], "gfpgan")
    with pytest.raises(UserError, match="GFPGANv1.4.pth is not a CodeFormer model"):
        load_model(face_files["gfpgan"], "codeformer")


@pytest.fixture()
def runtime(tmp_path, face_files):
    paths = DataPaths.from_args(parse_args(["--data-dir", str(tmp_path)]))
    paths.ensure_folders()
    link_models({"gfpgan": face_files["gfpgan"]}, paths.models_dir)
    cpu = torch.device("cpu")
    return PostprocessRuntime(paths, policies={part: DevicePolicy(device=cpu, dtype=torch.float32, vae_dtype=torch.float32)
                                               for part in DEVICE_PARTS})


class _Control:
    def __init__(self):
        self.steps = 0

    def interrupted(self):
        return False

    def step(self, _preview):
        self.steps += 1


def test_extras_visibility_zero_returns_the_input(runtime, astronaut):
    req = ExtrasRequest(gfpgan_visibility=0, codeformer_visibility=0, upscaler_1="None")
    out, steps, notes = extras.process_image(astronaut, req, runtime, {"face_detector": HAAR}, extras._Progress(_Control()))
    assert np.array_equal(np.asarray(out), np.asarray(astronaut)) and steps == "" and notes == []


def test_extras_visibility_blends_and_keeps_alpha(runtime, astronaut, gfpgan_result):
    rgba = astronaut.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(astronaut.size))
    req = ExtrasRequest(gfpgan_visibility=0.5)
    control = _Control()
    out, steps, _notes = extras.process_image(rgba, req, runtime, {"face_detector": HAAR}, extras._Progress(control))
    assert steps == "GFPGAN visibility: 0.5" and control.steps == 1
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out.getchannel("A")), np.asarray(rgba.getchannel("A")))
    expected = (np.asarray(astronaut, dtype=np.float64) + np.asarray(gfpgan_result.image, dtype=np.float64)) / 2
    assert np.abs(np.asarray(out.convert("RGB"), dtype=np.float64) - expected).max() <= 1.0


def test_job_function_records_face_restoration_in_infotext(runtime, monkeypatch):
    from types import SimpleNamespace

    import backend.downloads
    ramp = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    ctx = SimpleNamespace(postprocess=runtime, options={"face_restoration_model": "GFPGAN", "face_detector": HAAR},
                          warnings=[], extra_params={})
    out = fr.restore_faces_for_job(ctx, [ramp])
    assert ctx.extra_params == {"Face restoration": "GFPGAN"} and np.array_equal(np.asarray(out[0]), np.asarray(ramp))
    # no CodeFormer file in this data folder, and offline: the images are kept, with a warning
    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    ctx = SimpleNamespace(postprocess=runtime, options={"face_restoration_model": "CodeFormer"}, warnings=[],
                          extra_params={})
    out = fr.restore_faces_for_job(ctx, [ramp])
    assert out == [ramp] and "Face restoration" not in ctx.extra_params
    assert ctx.warnings and "No CodeFormer model found" in ctx.warnings[0]
