"""What each img2img sub-tab sends to the backend (image, mask), and the image/mask helpers."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.engine import image_ops
from backend.core.errors import UserError
from ui.img2img import drawn_mask, image_and_mask


def _bg(color=(10, 120, 200), size=(32, 24)) -> Image.Image:
    return Image.new("RGB", size, color)


def _stroke(size=(32, 24), color=(255, 0, 0, 255)) -> Image.Image:
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((4, 4, 11, 9), fill=color)
    return layer


def test_img2img_mode_sends_the_image_without_mask():
    img, mask = image_and_mask("img2img", _bg(), None, None, None, None, None)
    assert mask is None and img.getpixel((0, 0)) == (10, 120, 200)


def test_sketch_sends_the_composite():
    composite = _bg()
    composite.paste((255, 0, 0), (4, 4, 12, 10))
    img, mask = image_and_mask("sketch", None, {"background": _bg(), "layers": [_stroke()], "composite": composite},
                               None, None, None, None)
    assert mask is None and img.getpixel((5, 5)) == (255, 0, 0) and img.getpixel((20, 20)) == (10, 120, 200)


def test_inpaint_sends_the_background_and_the_painted_mask():
    img, mask = image_and_mask("inpaint", None, None, {"background": _bg(), "layers": [_stroke()], "composite": None},
                               None, None, None)
    assert img.getpixel((5, 5)) == (10, 120, 200)  # the strokes are a mask, not content
    m = np.asarray(mask)
    assert m[5, 5] == 255 and m[20, 20] == 0 and m.sum() == 255 * 8 * 6


def test_inpaint_sketch_sends_content_and_mask():
    composite = _bg()
    composite.paste((255, 0, 0), (4, 4, 12, 10))
    img, mask = image_and_mask("inpaint_sketch", None, None, None,
                               {"background": _bg(), "layers": [_stroke()], "composite": composite}, None, None)
    assert img.getpixel((5, 5)) == (255, 0, 0)
    assert np.asarray(mask)[5, 5] == 255 and np.asarray(mask)[20, 20] == 0


def test_inpaint_upload_sends_both_files():
    img, mask = image_and_mask("inpaint_upload", None, None, None, None, _bg(), Image.new("L", (32, 24), 255))
    assert mask.size == (32, 24) and img.mode == "RGB"


@pytest.mark.parametrize("mode, args, words", [
    ("img2img", (None, None, None, None, None, None), "Upload an image"),
    ("inpaint", (None, None, {"background": _bg(), "layers": [], "composite": None}, None, None, None), "Draw a mask"),
    ("inpaint_upload", (None, None, None, None, _bg(), None), "both an image and a mask"),
    ("sketch", (None, {"background": None, "layers": [], "composite": None}, None, None, None, None), "Upload an image"),
])
def test_missing_input_is_a_clear_message(mode, args, words):
    with pytest.raises(UserError, match=words):
        image_and_mask(mode, *args)


def test_drawn_mask_of_nothing_is_none():
    assert drawn_mask([Image.new("RGBA", (8, 8), (0, 0, 0, 0))], (8, 8)) is None


def test_resize_modes_give_the_size_and_keep_content():
    src = Image.new("RGB", (40, 20), (200, 10, 10))
    for mode in (0, 1, 2):
        assert image_ops.resize_image(mode, src, 32, 32).size == (32, 32)
    filled = np.asarray(image_ops.resize_image(2, src, 32, 32))
    assert (np.abs(filled.astype(int) - [200, 10, 10]).max(-1) < 3).all()  # bands stretched from the edges


def test_fill_spreads_colours_into_the_mask():
    img = Image.new("RGB", (32, 32), (0, 200, 0))
    img.paste((255, 255, 255), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = np.asarray(image_ops.fill_masked(img, mask))
    assert (np.abs(out[16, 16].astype(int) - [0, 200, 0]) < 3).all()
    assert (out[0, 0] == [0, 200, 0]).all()


def test_crop_region_and_ratio():
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))
    region = image_ops.crop_region(mask, 5)
    assert region == (35, 25, 55, 45)
    x1, y1, x2, y2 = image_ops.expand_to_ratio(region, 64, 32, 100, 80)
    assert (x2 - x1) / (y2 - y1) == pytest.approx(2, rel=0.05) and 0 <= x1 and x2 <= 100


def test_grow_canvas_sizes_and_mask():
    canvas, mask = image_ops.grow_canvas(Image.new("RGB", (64, 48), "red"), 20, ["left", "up"], mask_blur=0)
    assert canvas.size[0] % 8 == 0 and canvas.size[1] % 8 == 0
    assert canvas.size[0] >= 84 and canvas.size[1] >= 68
    m = np.asarray(mask)
    assert m[-1, -1] == 0 and m[0, 0] == 255


def test_flatten_handles_modes():
    assert image_ops.flatten(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert image_ops.flatten(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert image_ops.flatten(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
