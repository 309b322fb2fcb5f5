"""The Control Type filter (sd-webui-controlnet's radio) over Easel's preprocessor catalog."""
from __future__ import annotations

import numpy as np
from PIL import Image

from backend.core import control_types
from backend.core.preprocessor_catalog import all_preprocessors
from ui.controlnet import accordion_title, unit_title
from ui.img2img import drawn_mask


def test_types_are_those_with_preprocessors():
    names = control_types.control_type_names()
    assert names[0] == "All"
    assert {"Canny", "Depth", "OpenPose", "Scribble/Sketch", "Tile/Blur", "Inpaint", "Lineart"} <= set(names)
    assert "Reference" not in names and "IP-Adapter" not in names  # no such preprocessor in the catalog
    for name in names[1:]:
        modules = control_types.modules_for(name)
        assert modules[0] == "none" and len(modules) > 1
        assert control_types.default_module(name) in modules[1:]


def test_filters_and_defaults():
    assert control_types.modules_for("All") == [p.name for p in all_preprocessors()]
    assert control_types.modules_for("Canny") == ["none", "invert", "canny"]
    assert control_types.default_module("Tile/Blur") == "tile_resample"
    titles = ["None", "control_v11p_sd15_canny [aa]", "control_v11f1p_sd15_depth [bb]", "control_v11p_sd15_seg [cc]",
              "t2iadapter_color_sd14v1 [dd]"]
    assert control_types.models_for("Canny", titles) == ["None", "control_v11p_sd15_canny [aa]"]
    assert control_types.default_model("Depth", titles) == "control_v11f1p_sd15_depth [bb]"
    assert control_types.default_model("Segmentation", titles) == "control_v11p_sd15_seg [cc]"
    assert control_types.default_model("T2I-Adapter", titles) == "t2iadapter_color_sd14v1 [dd]"
    assert control_types.default_model("OpenPose", titles) == "None"
    assert control_types.default_model("All", titles) == "None"
    assert control_types.models_for("All", titles) == titles


def test_titles():
    assert accordion_title(False, False, False) == "ControlNet"
    assert accordion_title(True, False, False) == "ControlNet - 1 unit"
    assert accordion_title(True, True, False) == "ControlNet - 2 units"
    assert unit_title(0, False, "canny") == "ControlNet Unit 0"
    assert unit_title(0, True, "canny") == "ControlNet Unit 0 [Canny]"
    assert unit_title(1, True, "tile_resample") == "ControlNet Unit 1 [Tile/Blur]"
    assert unit_title(2, True, "none") == "ControlNet Unit 2 [none]"


def test_translucent_paint_masks_like_opaque_paint():
    opaque = np.zeros((32, 32, 4), np.uint8)
    opaque[10:20, 5:25] = (255, 255, 255, 255)
    half = opaque.copy()
    half[10:20, 5:25, 3] = 128
    a = np.asarray(drawn_mask([Image.fromarray(opaque, "RGBA")], (32, 32)))
    b = np.asarray(drawn_mask([Image.fromarray(half, "RGBA")], (32, 32)))
    assert (a == b).all() and a[15, 10] == 255 and a[0, 0] == 0
