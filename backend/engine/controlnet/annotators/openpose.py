"""OpenPose (body only): the CMU body pose network (`body_pose_model.pth`), part-affinity-field assembly of
people, ControlNet's OpenPose drawing and the OpenPose JSON of the people found; the `openpose` preprocessor
(which also returns that JSON for /controlnet/detect)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from backend.core.openpose_drawing import POSE_COLORS, POSE_LIMBS, draw_pose  # noqa: F401 (POSE_COLORS: tests)
from backend.engine.controlnet.preprocessors import resize_with_pad
from backend.engine.controlnet.annotators.common import ANNOTATORS_URL, AnnotatorEnv, WeightFile, env_from, resize_maps

# The PAF channels (x, y) of each limb of `POSE_LIMBS` (COCO-18 keypoints; the drawing is torch-free, in core).
POSE_PAF = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
            (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
OPENPOSE_BODY_WEIGHTS = WeightFile("body_pose_model.pth", "openpose", ANNOTATORS_URL + "body_pose_model.pth")


def network():
    """The CMU body pose network (VGG-19 front, 6 two-branch stages: 38 PAF and 19 heatmap channels).

    Layers are named as in `body_pose_model.pth` (conv1_1 ... Mconv7_stage6_L2), each file key being
    this module's key without its first component (`model0.conv1_1.weight` <- `conv1_1.weight`).
    """
    from collections import OrderedDict

    import torch
    from torch import nn

    def seq(spec, last_plain: str):
        layers = []
        for name, v in spec:
            if name.startswith("pool"):
                layers.append((name, nn.MaxPool2d(2, 2)))
            else:
                layers.append((name, nn.Conv2d(v[0], v[1], v[2], 1, v[2] // 2)))
                if name != last_plain:
                    layers.append(("relu_" + name, nn.ReLU(inplace=True)))
        return nn.Sequential(OrderedDict(layers))

    front = [("conv1_1", (3, 64, 3)), ("conv1_2", (64, 64, 3)), ("pool1_stage1", None), ("conv2_1", (64, 128, 3)),
             ("conv2_2", (128, 128, 3)), ("pool2_stage1", None), ("conv3_1", (128, 256, 3)), ("conv3_2", (256, 256, 3)),
             ("conv3_3", (256, 256, 3)), ("conv3_4", (256, 256, 3)), ("pool3_stage1", None), ("conv4_1", (256, 512, 3)),
             ("conv4_2", (512, 512, 3)), ("conv4_3_CPM", (512, 256, 3)), ("conv4_4_CPM", (256, 128, 3))]

    class BodyPose(nn.Module):
        def __init__(self):
            super().__init__()
            self.model0 = seq(front, "")
            for branch, out in ((1, 38), (2, 19)):
                setattr(self, f"model1_{branch}", seq(
                    [(f"conv5_{i}_CPM_L{branch}", (128, 128, 3)) for i in (1, 2, 3)]
                    + [(f"conv5_4_CPM_L{branch}", (128, 512, 1)), (f"conv5_5_CPM_L{branch}", (512, out, 1))],
                    f"conv5_5_CPM_L{branch}"))
                for stage in range(2, 7):
                    spec = [(f"Mconv1_stage{stage}_L{branch}", (185, 128, 7))]
                    spec += [(f"Mconv{i}_stage{stage}_L{branch}", (128, 128, 7)) for i in (2, 3, 4, 5)]
                    spec += [(f"Mconv6_stage{stage}_L{branch}", (128, 128, 1)),
                             (f"Mconv7_stage{stage}_L{branch}", (128, out, 1))]
                    # the original leaves a ReLU after Mconv7_stage6_L2 (its list names stage6_L1 twice)
                    plain = "" if (stage == 6 and branch == 2) else f"Mconv7_stage{stage}_L{branch}"
                    setattr(self, f"model{stage}_{branch}", seq(spec, plain))

        def forward(self, x):
            feats = self.model0(x)
            paf, heat = self.model1_1(feats), self.model1_2(feats)
            for stage in range(2, 7):
                h = torch.cat([paf, heat, feats], 1)
                paf, heat = getattr(self, f"model{stage}_1")(h), getattr(self, f"model{stage}_2")(h)
            return paf, heat

    return BodyPose()


def _openpose_keys(net, sd: dict) -> dict:
    """`conv1_1.weight` (file) -> `model0.conv1_1.weight` (module); files already in module names pass through."""
    own = net.state_dict().keys()
    if set(sd) & set(own):
        return sd
    return {k: sd[k.split(".", 1)[1]] for k in own if k.split(".", 1)[1] in sd}



def openpose_body(img: np.ndarray, env: AnnotatorEnv) -> list[list[tuple[float, float] | None]]:
    """People found in an RGB image: per person 18 keypoints as (x, y) pixel positions, or None where not found.

    Heatmaps and part-affinity fields at one scale (368 px boxes, stride 8), peaks of the smoothed
    heatmaps above 0.1, limbs scored along their PAF (10 samples, 80% above 0.05, a distance prior),
    greedy matching, then people assembled limb by limb; people with fewer than 4 parts or a mean
    score below 0.4 are dropped (the rules of the original OpenPose/pytorch-openpose code).
    """
    import torch
    net = env.load("openpose_body", OPENPOSE_BODY_WEIGHTS, "openpose", network, remap=_openpose_keys)
    h0, w0 = img.shape[:2]
    scale = 368.0 / h0
    bgr = np.ascontiguousarray(img[:, :, ::-1]).astype(np.float32)
    sh, sw = max(8, int(round(h0 * scale))), max(8, int(round(w0 * scale)))
    x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
    x = resize_maps(x, sh, sw)
    ph, pw = -sh % 8, -sw % 8
    x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=128.0)
    with torch.no_grad():
        paf, heat = net((x / 256.0 - 0.5).to(env.device))
        heat = resize_maps(heat.float().cpu(), (sh + ph), (sw + pw))[:, :, :sh, :sw]
        paf = resize_maps(paf.float().cpu(), (sh + ph), (sw + pw))[:, :, :sh, :sw]
        heat = resize_maps(heat, h0, w0)[0].permute(1, 2, 0).numpy()
        paf = resize_maps(paf, h0, w0)[0].permute(1, 2, 0).numpy()
    return assemble_people(heat, paf, h0)


def assemble_people(heat: np.ndarray, paf: np.ndarray, height: int) -> list:
    from backend.engine.controlnet.preprocessors import gaussian_blur
    peaks = []  # per part: [(x, y, score, id)]
    counter = 0
    for part in range(18):
        raw = heat[:, :, part]
        m = gaussian_blur(raw, 3.0)
        p = np.pad(m, 1)
        c = p[1:-1, 1:-1]
        found = (c >= p[1:-1, :-2]) & (c >= p[1:-1, 2:]) & (c >= p[:-2, 1:-1]) & (c >= p[2:, 1:-1]) & (c > 0.1)
        ys, xs = np.nonzero(found)
        peaks.append([(int(x), int(y), float(raw[y, x]), counter + i) for i, (x, y) in enumerate(zip(xs, ys))])
        counter += len(xs)
    candidates = [pk for part in peaks for pk in part]
    connections: list = []
    for k, ((a, b), (px, py)) in enumerate(zip(POSE_LIMBS, POSE_PAF)):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            connections.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.array([pb[0] - pa[0], pb[1] - pa[1]], dtype=np.float64)
                norm = max(0.001, float(np.hypot(*vec)))
                vec /= norm
                xs = np.round(np.linspace(pa[0], pb[0], 10)).astype(int)
                ys = np.round(np.linspace(pa[1], pb[1], 10)).astype(int)
                along = paf[ys, xs, px] * vec[0] + paf[ys, xs, py] * vec[1]
                score = float(along.mean()) + min(0.5 * height / norm - 1, 0)
                if (along > 0.05).sum() > 0.8 * len(along) and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda t: t[2], reverse=True)
        chosen, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i in used_a or j in used_b:
                continue
            chosen.append((cand_a[i][3], cand_b[j][3], score))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(cand_a), len(cand_b)):
                break
        connections.append(chosen)

    people: list[np.ndarray] = []  # rows: 18 candidate ids, total score, part count
    for k, chosen in enumerate(connections):
        if not chosen:
            continue
        ia, ib = POSE_LIMBS[k][0] - 1, POSE_LIMBS[k][1] - 1
        for id_a, id_b, score in chosen:
            hits = [n for n, row in enumerate(people) if row[ia] == id_a or row[ib] == id_b][:2]
            if len(hits) == 1:
                row = people[hits[0]]
                if row[ib] != id_b:
                    row[ib] = id_b
                    row[19] += 1
                    row[18] += candidates[id_b][2] + score
            elif len(hits) == 2:
                r1, r2 = people[hits[0]], people[hits[1]]
                overlap = ((r1[:18] >= 0) & (r2[:18] >= 0)).any()
                if not overlap:
                    r1[:18] += r2[:18] + 1
                    r1[18:] += r2[18:]
                    r1[18] += score
                    del people[hits[1]]
                else:
                    r1[ib] = id_b
                    r1[19] += 1
                    r1[18] += candidates[id_b][2] + score
            elif k < 17:
                row = -np.ones(20)
                row[ia], row[ib] = id_a, id_b
                row[19] = 2
                row[18] = candidates[id_a][2] + candidates[id_b][2] + score
                people.append(row)
    out = []
    for row in people:
        if row[19] < 4 or row[18] / row[19] < 0.4:
            continue
        out.append([None if row[i] < 0 else (float(candidates[int(row[i])][0]), float(candidates[int(row[i])][1]))
                    for i in range(18)])
    return out


def pose_json(people: list, width: int, height: int) -> dict:
    """People in the OpenPose JSON format sd-webui-controlnet's detect returns (and pose editors read):
    `pose_keypoints_2d` = 18 x [x, y, confidence], x and y as fractions of the canvas, [0, 0, 0] where not found."""
    def flat(person):
        return [v for p in person for v in ((p[0] / width, p[1] / height, 1.0) if p is not None else (0.0, 0.0, 0.0))]

    return {"people": [{"pose_keypoints_2d": flat(person), "face_keypoints_2d": None, "hand_left_keypoints_2d": None,
                        "hand_right_keypoints_2d": None} for person in people],
            "canvas_width": int(width), "canvas_height": int(height)}


def _openpose_with_json(img, res, a, b, seed, **kw) -> tuple[np.ndarray, dict]:
    padded, remove_pad = resize_with_pad(img, res)
    people = openpose_body(padded, env_from(kw))
    drawn = remove_pad(draw_pose(people, padded.shape[1], padded.shape[0]))
    return drawn, pose_json(people, drawn.shape[1], drawn.shape[0])


def _openpose(img, res, a, b, seed, **kw):
    return _openpose_with_json(img, res, a, b, seed, **kw)[0]


# name -> (run, run with poses or None): this module's entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    "openpose": (_openpose, _openpose_with_json),
}
