"""sd-webui-controlnet's unit format: defaults, enum names and numbers, legacy fields, sizing, infotext."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from backend.controlnet.units import (ControlUnit, check_unit, fit_control_map, parse_controlnet_args, parse_unit,
                                      parse_unit_infotext, pixel_perfect_resolution, unit_infotext)
from backend.core.errors import UserError


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_defaults_are_the_extensions():
    u = parse_unit({})
    assert (u.enabled, u.module, u.model, u.weight, u.resize_mode, u.processor_res, u.threshold_a, u.threshold_b,
            u.guidance_start, u.guidance_end, u.pixel_perfect, u.control_mode, u.hr_option) == \
        (True, "none", "None", 1.0, "Crop and Resize", -1, -1, -1, 0.0, 1.0, False, "Balanced", "Both")
    assert not u.has_model


@pytest.mark.parametrize("value,want", [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"),
                                        ("Resize and Fill", "Resize and Fill"), ("Scale to Fit (Inner Fit)", "Crop and Resize"),
                                        ("Envelope (Outer Fit)", "Resize and Fill"), ("2", "Resize and Fill")])
def test_resize_mode_names_and_numbers(value, want):
    assert parse_unit({"resize_mode": value}).resize_mode == want


def test_control_mode_names_numbers_and_guess_mode():
    assert parse_unit({"control_mode": 1}).control_mode == "My prompt is more important"
    assert parse_unit({"control_mode": "ControlNet is more important"}).control_mode == "ControlNet is more important"
    assert parse_unit({"guessmode": True}).control_mode == "ControlNet is more important"
    with pytest.raises(UserError, match="control_mode"):
        parse_unit({"control_mode": 7})


def test_api_round_trip_with_images():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    data = {"enabled": True, "image": b64(img), "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
            "weight": 0.8, "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": "My prompt is more important",
            "resize_mode": "Just Resize", "pixel_perfect": True, "processor_res": 384, "threshold_a": 50, "threshold_b": 150,
            "low_vram": False, "hr_option": "Low res only", "save_detected_map": True}
    u = parse_unit(data)
    api = u.to_api()
    for k, v in data.items():
        if k != "image":
            assert api[k] == v, k
    again = parse_unit(api)
    assert np.array_equal(np.asarray(again.image), np.asarray(img))
    assert again.to_api(encode_images=False) == u.to_api(encode_images=False)
    # legacy field names and {image, mask}
    legacy = parse_unit({"input_image": "data:image/png;base64," + b64(img), "lowvram": True})
    assert legacy.image.size == (40, 30) and legacy.low_vram
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 0, 20, 30))  # the left half
    masked = parse_unit({"image": {"image": b64(img), "mask": b64(mask)}})
    assert np.array_equal(np.asarray(masked.image.convert("RGB")), np.asarray(img))
    assert np.array_equal(np.asarray(masked.mask.convert("L")), np.asarray(mask))  # the mask, not the image again


def test_alwayson_scripts_shapes():
    assert parse_controlnet_args({}) == []
    assert parse_controlnet_args({"other": {"args": [1]}}) == []
    units = parse_controlnet_args({"ControlNet": {"args": [{"module": "canny"}, {"enabled": False}]}})
    assert [u.module for u in units] == ["canny", "none"] and not units[1].enabled
    with pytest.raises(UserError, match="image: invalid base64"):
        parse_controlnet_args({"controlnet": {"args": [{"image": "not base64!!"}]}})
    with pytest.raises(UserError, match="must be a list"):
        parse_controlnet_args({"controlnet": {"args": 5}})


def test_checks_and_warnings():
    with pytest.raises(UserError, match="weight must be between 0 and 2"):
        check_unit(ControlUnit(weight=3), 0)
    with pytest.raises(UserError, match="guidance_end must be between 0 and 1"):
        check_unit(ControlUnit(guidance_end=1.5), 1)
    warnings = check_unit(ControlUnit(guidance_start=0.8, guidance_end=0.2), 2)
    assert warnings and "unit 2" in warnings[0] and "skipped" in warnings[0]


def test_pixel_perfect_resolution():
    assert pixel_perfect_resolution(1024, 768, 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution(1024, 768, 512, 512, "Resize and Fill") == 384
    assert pixel_perfect_resolution(512, 512, 768, 512, "Crop and Resize") == 768


def test_fit_control_map_modes():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    just = fit_control_map(img, 64, 64, "Just Resize")
    assert just.size == (64, 64) and np.asarray(just).min() == 255
    crop = fit_control_map(img, 64, 64, "Crop and Resize")
    assert crop.size == (64, 64) and np.asarray(crop).min() == 255
    fill = np.asarray(fit_control_map(img, 64, 64, "Resize and Fill"))
    assert fill.shape == (64, 64, 3)
    assert fill[:15].max() == 0 and fill[-15:].max() == 0 and fill[20:44].min() == 255  # letterboxed in black
    edges = Image.fromarray(np.where(np.arange(100)[None, :, None] % 10 == 0, 255, 0).astype(np.uint8).repeat(3, 2).repeat(50, 0))
    assert set(np.unique(np.asarray(fit_control_map(edges, 37, 23, "Just Resize")))) <= {0, 255}  # stays two-valued


def test_infotext_as_the_extension_writes_it():
    u = ControlUnit(module="canny", model="control_v11p_sd15_canny [d14c016b]")
    text = unit_infotext(u, "control_v11p_sd15_canny [d14c016b]", "canny", 512, 100.0, 200.0)
    assert text == ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, "
                    "Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, "
                    "Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both")
    parsed = parse_unit_infotext(text)
    assert parsed["module"] == "canny" and parsed["weight"] == 1 and parsed["pixel_perfect"] is False
    back = parse_unit(parsed)
    assert (back.module, back.model, back.resize_mode, back.threshold_b) == ("canny", u.model, "Crop and Resize", 200)
    assert "Threshold A" not in unit_infotext(u, "None", "invert", None, None, None)
