"""POST /controlnet/render_openpose_json (sd-webui-controlnet's route) on the real server: OpenPose JSON drawn as
the openpose preprocessor draws the people it detects."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.core.openpose_drawing import POSE_COLORS


@pytest.fixture(scope="module")
def cn(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def person(points: dict[int, tuple[float, float]], **extra) -> dict:
    """18 body points (index -> (x, y) as fractions of the canvas); the others missing (confidence 0)."""
    flat = []
    for i in range(18):
        flat += [*points[i], 1.0] if i in points else [0.0, 0.0, 0.0]
    return {"pose_keypoints_2d": flat, **extra}


def rgb(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_render_openpose_json_draws_each_document(cn):
    nose, neck = (0.25, 0.2), (0.25, 0.6)
    docs = [{"people": [person({0: nose, 1: neck})], "canvas_width": 160, "canvas_height": 100},
            {"people": [], "canvas_width": 64, "canvas_height": 48}]
    r = cn.post("/controlnet/render_openpose_json", json=docs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 2
    first, empty = rgb(body["images"][0]), rgb(body["images"][1])
    assert first.shape == (100, 160, 3) and empty.shape == (48, 64, 3) and empty.max() == 0
    assert tuple(first[20, 40]) == POSE_COLORS[0] and tuple(first[60, 40]) == POSE_COLORS[1]  # the two joints
    # the neck-nose limb (COCO 2-1, the 13th limb) in its colour at 60%, and nothing else drawn
    assert tuple(first[40, 40]) == tuple(int(c * 0.6) for c in POSE_COLORS[12])
    assert first[:, 80:].max() == 0 and first[80:].max() == 0


def test_render_openpose_json_draws_hands_and_faces(cn):
    hand = [v for i in range(21) for v in (0.5 + 0.01 * (i % 5), 0.3 + 0.02 * (i // 5), 1.0)]
    face = [0.8, 0.8, 1.0] + [0.0, 0.0, 0.0] * 69
    doc = {"people": [person({}, hand_left_keypoints_2d=hand, hand_right_keypoints_2d=None, face_keypoints_2d=face)],
           "canvas_width": 100, "canvas_height": 100}
    image = rgb(cn.post("/controlnet/render_openpose_json", json=[doc]).json()["images"][0])
    assert tuple(image[30, 50]) == (0, 0, 255)  # a hand joint
    assert tuple(image[80, 80]) == (255, 255, 255)  # the face point
    assert image[:20].max() == 0


def test_render_openpose_json_empty_and_bad_input(cn):
    assert cn.post("/controlnet/render_openpose_json", json=[]).json() == {"info": "No pose data detected."}
    bad = [({"people": [], "canvas_width": 0, "canvas_height": 10}, "pose_data[0].canvas_width"),
           ({"people": [{"pose_keypoints_2d": [0.1, 0.2]}], "canvas_width": 10, "canvas_height": 10},
            "pose_data[0].people[0].pose_keypoints_2d"),
           ({"people": [{}], "canvas_width": 10, "canvas_height": 10}, "pose_keypoints_2d is missing"),
           ({"canvas_width": 10, "canvas_height": 10}, "pose_data[0].people")]
    for doc, words in bad:
        r = cn.post("/controlnet/render_openpose_json", json=[doc])
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = cn.post("/controlnet/render_openpose_json", content=b'[{"people": [], "canvas_width": NaN}]',
                headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
