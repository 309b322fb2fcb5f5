"""Preprocessors on a drawn test image: map sizes and content; annotators with their weight files; offline errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.controlnet import annotators
from backend.controlnet.annotators import AnnotatorEnv
from backend.controlnet.preprocessors import canny_edges, find_preprocessor, otsu_threshold, run_preprocessor
from backend.errors import UserError

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
    _write_weights(tmp_path, annotators.HED_WEIGHTS, annotators._hed_network)
    _write_weights(tmp_path, annotators.LINEART_WEIGHTS, annotators._lineart_network, sub=True)  # downloads/<name>/ layout
    env = AnnotatorEnv(tmp_path, allow_download=False)
    img = drawn()
    for name in ("softedge_hed", "softedge_hedsafe", "scribble_hed", "lineart_realistic"):
        out = run(name, img, res=64, env=env)
        assert out.size == (85, 64), name  # short side 64, aspect kept
    safe = arr(run("hed_safe", img, res=64, env=env))
    assert len(np.unique(safe)) <= 3
    assert set(env.models) == {"hed", "lineart"}


def test_hed_weight_names_match_the_public_file_layout():
    keys = set(annotators._hed_network().state_dict())
    assert {"norm", "block1.convs.0.weight", "block1.projection.weight", "block5.convs.2.bias"} <= keys
    keys = set(annotators._lineart_network().state_dict())
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
