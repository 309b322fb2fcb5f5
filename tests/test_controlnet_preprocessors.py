"""Preprocessors on a drawn test image: map sizes and content; annotators with their weight files; offline errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.engine.controlnet import annotators
from backend.engine.controlnet.annotators import (AnnotatorEnv, depth_anything, hed, lineart, lineart_anime, mlsd,
                                                  normal_bae, openpose, uniformer)
from backend.core.preprocessor_catalog import all_preprocessors, find_preprocessor
from backend.engine.controlnet.preprocessors import WEIGHTLESS_RUNNERS, canny_edges, otsu_threshold, run_preprocessor
from backend.core.errors import UserError

torch.set_num_threads(1)


def drawn(w: int = 128, h: int = 96) -> Image.Image:
    """Black picture with a white rectangle (x 32..95, y 24..71) and a red disc."""
    img = Image.new("RGB", (w, h), (0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rectangle((32, 24, 95, 71), fill=(255, 255, 255))
    d.ellipse((4, 4, 20, 20), fill=(255, 0, 0))
    return img


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int32)


def run(name, img, res=-1, a=-1, b=-1, **kw):
    return run_preprocessor(find_preprocessor(name), img, res, a, b, **kw)


def test_catalog_and_runners_name_the_same_preprocessors():
    # The app lists the catalog (no torch); the backend runs each entry by name: neither may lack the other.
    listed = all_preprocessors()
    assert [p.name for p in listed if p.model_free] == list(WEIGHTLESS_RUNNERS)
    assert [p.name for p in listed if not p.model_free] == list(annotators.RUNNERS)
    weight_files = {w.filename for w in annotators.WEIGHT_FILES}
    for p in listed:
        assert p.model_free == (not p.weights) and set(p.weights) <= weight_files, p.name
        assert p.finds_poses == (p.model_free is False and annotators.RUNNERS[p.name][1] is not None), p.name


def test_canny_finds_the_rectangle_outline_only():
    out = run("canny", drawn(), res=96)
    assert out.size == (128, 96)  # short side = processor resolution
    a = arr(out)[..., 0]
    assert set(np.unique(a)) <= {0, 255}
    # each side of the rectangle has an edge within a pixel of it
    for y in range(30, 66):
        assert a[y, 30:34].max() == 255 and a[y, 94:98].max() == 255
    for x in range(38, 90):
        assert a[22:26, x].max() == 255 and a[70:74, x].max() == 255
    assert a[35:60, 45:85].max() == 0  # inside the flat rectangle: nothing
    assert a[80:, 100:].max() == 0  # flat background: nothing
    assert (arr(out)[..., 0] == arr(out)[..., 2]).all()


def test_canny_thresholds_and_resolution():
    img = drawn()
    grey = Image.new("RGB", (128, 96), (0, 0, 0))
    ImageDraw.Draw(grey).rectangle((32, 24, 95, 71), fill=(20, 20, 20))  # a weak edge: Sobel magnitude at most 160
    weak = arr(run("canny", grey, res=96, a=100, b=200))
    assert weak.max() == 0  # below the high threshold: no edge
    assert arr(run("canny", grey, res=96, a=10, b=20)).max() == 255
    big = run("canny", img, res=192)
    assert big.size == (256, 192)
    assert canny_edges(np.zeros((10, 10, 3), np.uint8), 100, 200).max() == 0


def test_weightless_preprocessors_sizes_and_content():
    img = drawn()
    a = arr(img)
    assert np.array_equal(arr(run("none", img)), a)
    inv = run("invert (from white bg & black line)", img)
    assert np.array_equal(arr(inv), 255 - a)
    binary = arr(run("binary", img, res=96, a=127))
    assert binary.shape == (96, 128, 3)
    assert binary[40, 60, 0] == 0 and binary[80, 110, 0] == 255  # dark areas become white strokes
    thr = arr(run("threshold", img, res=96, a=127))
    assert thr[40, 60, 0] == 255 and thr[80, 110, 0] == 0
    blur = arr(run("blur_gaussian", img, res=96, a=4))
    assert blur.shape == (96, 128, 3) and 0 < blur[24, 64, 0] < 255 and abs(blur.mean() - a.mean()) < 8
    tile = run("tile_resample", img, a=2.0)
    assert tile.size == (64, 48)
    assert run("tile_resample", img, a=1.0).size == (128, 96)
    grid = arr(run("color", Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (128, 1, 3))), res=128))
    assert grid.shape == (128, 256, 3)
    assert (grid[:, :64] == grid[0, 0]).all() and (grid[:, 64:128] == grid[0, 64]).all() and grid[0, 0, 0] < grid[0, 200, 0]
    line = arr(run("lineart_standard", Image.fromarray(255 - a.astype(np.uint8)), res=96))
    assert line.shape == (96, 128, 3)
    assert line[24:72, 30:35].max() > 100 and line[40:55, 55:70].max() < 16 and line[85:, 105:].max() < 16
    xdog = arr(run("scribble_xdog", img, res=96))
    assert xdog.shape == (96, 128, 3) and xdog[40:56, 31:34].max() == 255 and xdog[40:55, 55:70].max() == 0


def test_shuffle_is_seeded_and_keeps_the_colours():
    img = drawn()
    one = arr(run("shuffle", img, res=96, seed=7))
    assert one.shape == (96, 128, 3)
    assert np.array_equal(one, arr(run("shuffle", img, res=96, seed=7)))
    assert not np.array_equal(one, arr(run("shuffle", img, res=96, seed=8)))
    assert not np.array_equal(one, arr(img))
    assert set(np.unique(one[..., 1])) <= set(range(256)) and one.max() == 255


def test_otsu_splits_two_levels():
    g = np.array([[10] * 50 + [200] * 50], dtype=np.uint8)
    assert 10 <= otsu_threshold(g) < 200


def test_unknown_preprocessor_is_a_clear_error():
    with pytest.raises(UserError, match="Unknown ControlNet preprocessor 'cany'. Available: none, invert, canny"):
        find_preprocessor("cany")
    assert find_preprocessor("softedge_hed").name == "hed"
    assert find_preprocessor("lineart_realistic").name == "lineart"
    assert find_preprocessor(None).name == "none"


# -- annotators -----------------------------------------------------------------------------------
def _write_weights(folder, weights, build, sub: bool = False):
    net = build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    target = (folder / weights.subfolder if sub else folder) / weights.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), target)
    return target


def test_hed_and_lineart_run_with_their_weight_files(tmp_path):
    _write_weights(tmp_path, hed.HED_WEIGHTS, hed.network)
    _write_weights(tmp_path, lineart.LINEART_WEIGHTS, lineart.network, sub=True)  # downloads/<name>/ layout
    env = AnnotatorEnv(tmp_path, allow_download=False)
    img = drawn()
    for name in ("softedge_hed", "softedge_hedsafe", "scribble_hed", "lineart_realistic"):
        out = run(name, img, res=64, env=env)
        assert out.size == (85, 64), name  # short side 64, aspect kept
    safe = arr(run("hed_safe", img, res=64, env=env))
    assert len(np.unique(safe)) <= 3
    assert set(env.models) == {"hed"}  # one annotator network kept at a time (the last used)


def test_hed_weight_names_match_the_public_file_layout():
    keys = set(hed.network().state_dict())
    assert {"norm", "block1.convs.0.weight", "block1.projection.weight", "block5.convs.2.bias"} <= keys
    keys = set(lineart.network().state_dict())
    assert {"model0.1.weight", "model1.0.weight", "model1.3.weight", "model2.0.conv_block.1.weight",
            "model2.2.conv_block.5.bias", "model3.0.weight", "model3.3.weight", "model4.1.weight"} == \
        {k for k in keys if k in {"model0.1.weight", "model1.0.weight", "model1.3.weight", "model2.0.conv_block.1.weight",
                                  "model2.2.conv_block.5.bias", "model3.0.weight", "model3.3.weight", "model4.1.weight"}}


def test_missing_annotator_weights_offline_name_the_file_and_the_folder(tmp_path, monkeypatch):
    env = AnnotatorEnv(tmp_path / "ControlNet-annotators", allow_download=False)
    with pytest.raises(UserError) as err:
        run("lineart_coarse", drawn(), res=64, env=env)
    msg = err.value.message
    assert "sk_model2.pth" in msg and str(tmp_path / "ControlNet-annotators") in msg and "huggingface.co" in msg
    import backend.downloads
    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    env = AnnotatorEnv(tmp_path / "ControlNet-annotators", allow_download=True)
    with pytest.raises(UserError, match="ControlNetHED.pth.*no internet connection"):
        run("hed", drawn(), res=64, env=env)


def test_openpose_and_mlsd_run_with_their_weight_files(tmp_path):
    net = openpose.network()
    # body_pose_model.pth names its layers without the block prefix (conv1_1.weight, Mconv7_stage6_L2.bias)
    torch.save({k.split(".", 1)[1]: v * 0.01 for k, v in net.state_dict().items()}, tmp_path / "body_pose_model.pth")
    _write_weights(tmp_path, mlsd.MLSD_WEIGHTS, mlsd.network)
    env = AnnotatorEnv(tmp_path, allow_download=False)
    out = run("openpose", drawn(), res=64, env=env)
    assert out.size == (85, 64) and arr(out).max() == 0  # random weights find nobody: a black map
    # /controlnet/detect's half in the backend: the same map, and the poses as OpenPose JSON
    from backend.engine.controlnet.preprocessors import run_detect_job
    detected = run_detect_job({"module": "openpose", "images": [drawn()], "processor_res": 64}, env)
    assert detected["poses"] == [{"people": [], "canvas_width": 85, "canvas_height": 64}]
    assert Image.open(io.BytesIO(detected["maps"][0])).size == (85, 64)
    assert run_detect_job({"module": "canny", "images": [drawn()], "processor_res": 64}, env)["poses"] == [None]
    lines = run("mlsd", drawn(), res=64, a=0.0, b=0.0, env=env)
    assert lines.size == (85, 64) and set(np.unique(arr(lines))) <= {0, 255}


def test_openpose_assembles_a_person_from_heatmaps_and_pafs():
    """A stick figure's keypoint peaks and limb fields -> one person with those keypoints, drawn in its colours."""
    h, w = 200, 160
    points = {1: (80, 30), 2: (80, 60), 3: (55, 60), 4: (45, 95), 5: (40, 125), 6: (105, 60), 7: (115, 95),
              8: (120, 125), 9: (65, 120), 10: (62, 155), 11: (60, 190), 12: (95, 120), 13: (98, 155),
              14: (100, 190), 15: (74, 24), 16: (86, 24), 17: (68, 28), 18: (92, 28)}
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.zeros((h, w, 19), np.float32)
    for k, (x, y) in points.items():
        heat[:, :, k - 1] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0 ** 2))
    paf = np.zeros((h, w, 38), np.float32)
    for (a, b), (px, py) in zip(openpose.POSE_LIMBS, openpose.POSE_PAF):
        (x0, y0), (x1, y1) = points[a], points[b]
        v = np.array([x1 - x0, y1 - y0], np.float32)
        length = float(np.hypot(*v))
        v /= length
        t = ((xx - x0) * v[0] + (yy - y0) * v[1])
        d = np.abs((xx - x0) * v[1] - (yy - y0) * v[0])
        on = (t >= -2) & (t <= length + 2) & (d <= 3)
        paf[on, px] = v[0]
        paf[on, py] = v[1]
    people = openpose.assemble_people(heat, paf, h)
    assert len(people) == 1
    for k, (x, y) in points.items():
        got = people[0][k - 1]
        assert got is not None and abs(got[0] - x) <= 1 and abs(got[1] - y) <= 1, (k, got)
    drawing = openpose.draw_pose(people, w, h)
    assert tuple(drawing[30, 80]) == openpose.POSE_COLORS[0]  # the nose joint
    assert drawing[5:15, 5:15].max() == 0


def test_depth_anything_runs_with_a_weight_file_and_sizes_itself_from_it(tmp_path):
    embed = 64
    shapes = {"pretrained.cls_token": torch.zeros(1, 1, embed), "pretrained.pos_embed": torch.zeros(1, 1 + 37 * 37, embed),
              "depth_head.scratch.layer1_rn.weight": torch.zeros(16, 16, 3, 3)}
    shapes.update({f"pretrained.blocks.{i}.norm1.weight": torch.zeros(embed) for i in range(4)})
    shapes.update({f"depth_head.projects.{i}.weight": torch.zeros(c, embed, 1, 1) for i, c in enumerate((16, 32, 64, 64))})
    net = depth_anything.network(shapes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0))
        net.depth_head.scratch.output_conv2[0].bias.fill_(0.5)  # keep the final ReLUs open on random weights
        net.depth_head.scratch.output_conv2[2].bias.fill_(1.0)
    torch.save(net.state_dict(), tmp_path / "depth_anything_vitl14.pth")
    env = AnnotatorEnv(tmp_path, allow_download=False)
    out = arr(run("depth_anything", drawn(), res=64, env=env))
    assert out.shape == (64, 85, 3)
    assert out.max() - out.min() > 50  # min-max normalised (over the padded working image)
    full = depth_anything.network()
    keys = set(full.state_dict())
    assert {"pretrained.blocks.23.ls2.gamma", "pretrained.blocks.0.attn.qkv.weight", "pretrained.mask_token",
            "depth_head.scratch.refinenet4.resConfUnit2.conv1.weight", "depth_head.scratch.output_conv2.2.weight",
            "depth_head.resize_layers.3.weight"} <= keys
    assert full.pretrained.pos_embed.shape == (1, 1370, 1024)


def test_normal_bae_runs_with_scannet_pt(tmp_path):
    net = normal_bae.network()
    sd = {"module." + k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save({"model": sd, "epoch": 12}, tmp_path / "scannet.pt")  # as the file is: {"model": ...}, DataParallel names
    env = AnnotatorEnv(tmp_path, allow_download=False)
    out = arr(run("normal_bae", drawn(), res=64, env=env))
    assert out.shape == (64, 85, 3)
    n = out.astype(np.float64) / 255.0 * 2 - 1
    length = np.sqrt((n ** 2).sum(-1))
    assert np.abs(length - 1).mean() < 0.05  # unit normals, encoded as (n + 1) / 2
    keys = set(net.state_dict())
    assert {"encoder.original_model.blocks.6.2.conv_pwl.weight", "encoder.original_model.blocks.0.0.se.conv_reduce.weight",
            "encoder.original_model.conv_head.weight", "decoder.up4._net.3.weight", "decoder.out_conv_res1.6.weight"} <= keys


def test_segmentation_runs_with_the_mmseg_checkpoint(tmp_path):
    net = uniformer.network()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    sd["auxiliary_head.conv_seg.weight"] = torch.zeros(150, 256, 1, 1)  # training-only head in the real file
    meta = {"CLASSES": ("wall", "building"), "PALETTE": [[120, 120, 120], [180, 120, 120]], "mmcv_version": "1.3.0"}
    torch.save({"meta": meta, "state_dict": sd}, tmp_path / "upernet_global_small.pth")
    env = AnnotatorEnv(tmp_path, allow_download=False)
    out = arr(run("seg_ufade20k", drawn(), res=64, env=env))
    assert out.shape == (64, 85, 3)
    palette = {tuple(c) for c in uniformer.ADE20K_PALETTE}
    assert {tuple(p) for p in out.reshape(-1, 3)} <= palette
    assert len(uniformer.ADE20K_PALETTE) == 150


def test_pose_json_is_openpose_format_with_fractions_of_the_canvas():
    person = [None] * 18
    person[0], person[1] = (40.0, 10.0), (40.0, 30.0)
    doc = openpose.pose_json([person], 80, 60)
    assert doc["canvas_width"] == 80 and doc["canvas_height"] == 60 and len(doc["people"]) == 1
    keypoints = doc["people"][0]["pose_keypoints_2d"]
    assert len(keypoints) == 54 and keypoints[:6] == [0.5, 10 / 60, 1.0, 0.5, 0.5, 1.0] and keypoints[6:9] == [0, 0, 0]
    assert doc["people"][0]["hand_left_keypoints_2d"] is None


def test_lineart_anime_runs_with_its_weight_file(tmp_path):
    names = set(lineart_anime.network().state_dict())
    # pix2pix's UnetGenerator naming, as netG.pth has it: nested `model` Sequentials, convs with biases
    assert {"model.model.0.weight", "model.model.3.bias", "model.model.1.model.1.weight",
            "model.model.1.model.5.bias"} <= names and len(names) == 32
    _write_weights(tmp_path, lineart_anime.LINEART_ANIME_WEIGHTS, lineart_anime.network)
    env = AnnotatorEnv(tmp_path, allow_download=False)
    out = run("lineart_anime", drawn(), res=64, env=env)
    assert out.size == (85, 64) and out.mode == "RGB"
    a = arr(out)
    assert (a[..., 0] == a[..., 1]).all() and a.std() > 0  # grey lines, not a blank map
    with pytest.raises(UserError, match="netG.pth"):
        run("lineart_anime", drawn(), res=64, env=AnnotatorEnv(tmp_path / "empty", allow_download=False))
