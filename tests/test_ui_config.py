"""ui-config.json: the UI controls' defaults and limits, as AUTOMATIC1111 keeps them (`ui/ui_config.py`).

The UI is built on a service whose backend process is never started: the file is written with every control's
default when missing, an edited default / maximum shows in the built page's component config, a malformed file
is logged and the built-in defaults are used, and no value there lifts the server's own checks.
"""
from __future__ import annotations

import json
import logging

import pytest

from backend.core.cmd_args import parse_args
from backend.core.errors import UserError
from backend.core.schemas import Txt2ImgRequest


def _build(data_dir, *flags):
    from backend.service import EaselService
    import ui.layout

    service = EaselService(parse_args(["--data-dir", str(data_dir), "--no-download-sd-model", *flags]))
    return service, ui.layout.build_ui(service)


def _component(demo, elem_id: str) -> dict:
    found = [c["props"] for c in demo.config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_missing_file_is_written_with_every_controls_default(tmp_path):
    _service, demo = _build(tmp_path)
    stored = json.loads((tmp_path / "ui-config.json").read_text())
    assert stored["txt2img/Sampling steps/value"] == 20
    assert stored["txt2img/Sampling steps/minimum"] == 1
    assert stored["txt2img/Sampling steps/maximum"] == 150
    assert stored["txt2img/Width/maximum"] == 2048
    assert stored["txt2img/Width/step"] == 8
    assert stored["img2img/Denoising strength/value"] == 0.75
    assert stored["txt2img/Enable hires. fix/value"] is False
    assert stored["img2img/Resize mode/value"] == "Just resize"
    assert not any(key.startswith(("settings/", "extensions/")) for key in stored)  # those come from config.json
    assert _component(demo, "txt2img_steps")["value"] == 20


def test_edited_values_become_the_controls_defaults_and_limits_and_stay_in_the_file(tmp_path):
    path = tmp_path / "ui-config.json"
    path.write_text(json.dumps({"txt2img/Sampling steps/value": 30, "txt2img/Width/maximum": 4096,
                                "txt2img/Width/value": 768, "img2img/Denoising strength/value": 0.5,
                                "txt2img/Enable hires. fix/value": True, "img2img/Resize mode/value": "Crop and resize",
                                "txt2img/Prompt/value": "a lighthouse"}))
    _service, demo = _build(tmp_path)
    steps = _component(demo, "txt2img_steps")
    assert steps["value"] == 30 and steps["maximum"] == 150
    width = _component(demo, "txt2img_width")
    assert width["value"] == 768 and width["maximum"] == 4096
    assert _component(demo, "img2img_width")["maximum"] == 2048  # another tab's control keeps its own
    assert _component(demo, "img2img_denoising_strength")["value"] == 0.5
    assert _component(demo, "txt2img_enable_hr")["value"] is True
    assert _component(demo, "txt2img_prompt")["value"] == "a lighthouse"
    stored = json.loads(path.read_text())
    assert stored["txt2img/Sampling steps/value"] == 30 and stored["txt2img/Width/maximum"] == 4096
    assert stored["txt2img/Height/maximum"] == 2048  # the controls the file lacked were added


def test_custom_path_flag(tmp_path):
    custom = tmp_path / "elsewhere" / "my-ui.json"
    _build(tmp_path / "data", "--ui-config-file", str(custom))
    assert json.loads(custom.read_text())["txt2img/Sampling steps/value"] == 20
    assert not (tmp_path / "data" / "ui-config.json").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_malformed_file_is_logged_and_left_alone_and_defaults_are_used(tmp_path, caplog, text):
    path = tmp_path / "ui-config.json"
    path.write_text(text, encoding="latin-1")
    before = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="ui.ui_config"):
        _service, demo = _build(tmp_path)
    assert _component(demo, "txt2img_steps")["value"] == 20
    assert path.read_bytes() == before  # the user's file is kept for fixing
    assert any(str(path) in r.getMessage() and "defaults" in r.getMessage() for r in caplog.records)


def test_a_value_that_does_not_fit_its_control_is_refused_with_a_warning(tmp_path, caplog):
    path = tmp_path / "ui-config.json"
    path.write_text(json.dumps({"txt2img/Sampling steps/value": "lots", "txt2img/Width/maximum": float("nan"),
                                "img2img/Resize mode/value": "Stretch it", "txt2img/Height/step": 0,
                                "txt2img/Enable hires. fix/value": "yes"}).replace("NaN", "NaN"))
    with caplog.at_level(logging.WARNING, logger="ui.ui_config"):
        _service, demo = _build(tmp_path)
    assert _component(demo, "txt2img_steps")["value"] == 20
    assert _component(demo, "txt2img_width")["maximum"] == 2048
    assert _component(demo, "txt2img_height")["step"] == 8
    assert _component(demo, "txt2img_enable_hr")["value"] is False
    messages = " ".join(r.getMessage() for r in caplog.records)
    for key in ("txt2img/Sampling steps/value", "txt2img/Width/maximum", "img2img/Resize mode/value",
                "txt2img/Height/step", "txt2img/Enable hires. fix/value"):
        assert key in messages
    assert json.loads(path.read_text())["txt2img/Sampling steps/value"] == "lots"  # kept for the user to fix


def test_a_larger_ui_maximum_does_not_lift_the_servers_limits(tmp_path):
    (tmp_path / "ui-config.json").write_text(json.dumps({"txt2img/Sampling steps/maximum": 5000,
                                                        "txt2img/Sampling steps/value": 4000}))
    service, demo = _build(tmp_path)
    assert _component(demo, "txt2img_steps")["maximum"] == 5000  # a hint to the page only
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        service._job_payload(Txt2ImgRequest(prompt="x", steps=4000))  # what every UI and API job passes
