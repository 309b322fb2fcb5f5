"""Drawing OpenPose skeletons as ControlNet's OpenPose models were trained on them, and reading OpenPose JSON.

Torch-free (numpy and PIL): the engine's `openpose` preprocessor draws the people it detects with `draw_pose`, and
the app's `POST /controlnet/render_openpose_json` draws people sent as OpenPose JSON (the format
/controlnet/detect returns and pose editors write: `people[].pose_keypoints_2d` = 18 x [x, y, confidence] with x
and y as fractions of `canvas_width` x `canvas_height`, a point with confidence below 1 not drawn; optional
`hand_left_keypoints_2d`, `hand_right_keypoints_2d` (21 points) and `face_keypoints_2d` (70 points)).
"""
from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np

from backend.core.errors import UserError

# COCO-18 keypoints; limbs as pairs of 1-based keypoint numbers, and the colours of ControlNet's OpenPose drawing.
POSE_LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
              (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
POSE_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
# The 21 hand points: the wrist, then four per finger; each finger's bones, coloured around the hue circle.
HAND_BONES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
MAX_CANVAS_SIDE = 8192  # a pose canvas larger than this is refused (a JSON body must not allocate gigabytes)

Point = tuple[float, float] | None


def draw_pose(people: list[list[Point]], width: int, height: int, hands: list[list[Point]] = (),
              faces: list[list[Point]] = ()) -> np.ndarray:
    """People (18 body points each, in pixels; None where missing) as ControlNet's OpenPose models expect them:
    coloured limbs (ellipses at 60%) and joints on black; hands (bones in hue order, blue joints) and faces (white
    dots) when given. -> HxWx3 uint8."""
    from PIL import Image, ImageDraw
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for person in people:
        for (a, b), color in zip(POSE_LIMBS, POSE_COLORS):
            p1, p2 = person[a - 1], person[b - 1]
            if p1 is None or p2 is None:
                continue
            cx, cy = (p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2
            length = math.hypot(p1[0] - p2[0], p1[1] - p2[1]) / 2
            angle = math.atan2(p1[1] - p2[1], p1[0] - p2[0])
            pts = [(cx + length * math.cos(t) * math.cos(angle) - 4 * math.sin(t) * math.sin(angle),
                    cy + length * math.cos(t) * math.sin(angle) + 4 * math.sin(t) * math.cos(angle))
                   for t in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
            draw.polygon(pts, fill=tuple(int(c * 0.6) for c in color))
        for point, color in zip(person, POSE_COLORS):
            if point is not None:
                draw.ellipse((point[0] - 4, point[1] - 4, point[0] + 4, point[1] + 4), fill=color)
    for hand in hands:
        for i, (a, b) in enumerate(HAND_BONES):
            if a < len(hand) and b < len(hand) and hand[a] is not None and hand[b] is not None:
                color = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0))
                draw.line((hand[a], hand[b]), fill=color, width=2)
        for point in hand:
            if point is not None:
                draw.ellipse((point[0] - 4, point[1] - 4, point[0] + 4, point[1] + 4), fill=(0, 0, 255))
    for face in faces:
        for point in face:
            if point is not None:
                draw.ellipse((point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3), fill=(255, 255, 255))
    return np.asarray(canvas)


def _points(values: Any, where: str, width: int, height: int) -> list[Point] | None:
    """A flat [x, y, confidence, ...] list (fractions of the canvas) -> points in pixels (None: confidence < 1)."""
    if values is None:
        return None
    if not isinstance(values, list) or len(values) % 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise UserError(f"{where} must be a list of finite numbers, three per point (x, y, confidence).", status=422)
    # far-off points are drawn as lines leaving the canvas (clamped: PIL's integer coordinates must not overflow)
    return [(min(max(x, -4.0), 5.0) * width, min(max(y, -4.0), 5.0) * height) if c >= 1.0 else None
            for x, y, c in (values[i:i + 3] for i in range(0, len(values), 3))]


def render_pose_json(pose: dict, where: str = "pose") -> np.ndarray:
    """One OpenPose JSON document (people, canvas_width, canvas_height) drawn as `draw_pose` draws detected people.
    Bad input raises `UserError` (422) naming the field."""
    if not isinstance(pose, dict):
        raise UserError(f"{where} must be an OpenPose JSON object with people, canvas_width and canvas_height.",
                        status=422)
    size = {}
    for key in ("canvas_width", "canvas_height"):
        value = pose.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CANVAS_SIDE:
            raise UserError(f"{where}.{key} must be a whole number of pixels from 1 to {MAX_CANVAS_SIDE}.", status=422)
        size[key] = value
    width, height = size["canvas_width"], size["canvas_height"]
    people = pose.get("people")
    if not isinstance(people, list):
        raise UserError(f"{where}.people must be a list of people.", status=422)
    bodies, hands, faces = [], [], []
    for i, person in enumerate(people):
        here = f"{where}.people[{i}]"
        if not isinstance(person, dict):
            raise UserError(f"{here} must be an object with pose_keypoints_2d.", status=422)
        body = _points(person.get("pose_keypoints_2d"), f"{here}.pose_keypoints_2d", width, height)
        if body is None:
            raise UserError(f"{here}.pose_keypoints_2d is missing.", status=422)
        bodies.append((body + [None] * 18)[:18])
        for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"):
            hand = _points(person.get(key), f"{here}.{key}", width, height)
            if hand:
                hands.append(hand)
        face = _points(person.get("face_keypoints_2d"), f"{here}.face_keypoints_2d", width, height)
        if face:
            faces.append(face)
    return draw_pose(bodies, width, height, hands, faces)
