"""Inputs accepted for AUTOMATIC1111 compatibility but not acted on are named in warnings, never dropped silently:
flags in the log at start, request fields in the job's `info["warnings"]` (`backend.core.ignored_inputs`)."""
from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from backend.core.cmd_args import parse_args
from backend.core.ignored_inputs import IGNORED_FIELDS, IGNORED_FLAGS, flag_warnings, request_warnings
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest

# a value other than the default for every ignored field
SET_VALUES = {
    "comments": {"a comment": 1},
    "firstphase_width": 512, "firstphase_height": 512, "sampler_index_legacy": 3, "image_cfg_scale": 1.5,
    "latent_mask": "iVBORw0KGgo=",
}
IMG2IMG_ONLY = {"image_cfg_scale", "latent_mask"}


def test_every_ignored_field_is_covered_here():
    assert set(SET_VALUES) == set(IGNORED_FIELDS)


@pytest.mark.parametrize("field", sorted(SET_VALUES))
def test_a_set_field_is_named_in_a_warning(field):
    cls = Img2ImgRequest if field in IMG2IMG_ONLY else Txt2ImgRequest
    warnings = request_warnings(cls(**{field: SET_VALUES[field]}))
    assert len(warnings) == 1 and warnings[0].startswith(f"{field} "), warnings


@pytest.mark.parametrize("cls", [Txt2ImgRequest, Img2ImgRequest])
def test_defaults_give_no_warning(cls):
    assert request_warnings(cls()) == []
    # the values A1111's clients send for "not used" count as defaults too
    assert request_warnings(cls(hr_checkpoint_name="Use same checkpoint", s_min_uncond=0, styles=[], comments={},
                                firstphase_width=0, infotext="", force_task_id="")) == []


def test_many_fields_many_warnings():
    req = Img2ImgRequest(**SET_VALUES)
    warnings = request_warnings(req)
    assert len(warnings) == len(SET_VALUES)
    for field in SET_VALUES:
        assert any(w.startswith(f"{field} ") for w in warnings), field


def test_scripts_are_not_ignored_inputs():
    # script_name and alwayson_scripts are checked at the edge (backend.core.scripts_catalog: unknown ones are a
    # 422, as in A1111), never warned about as ignored
    assert request_warnings(Txt2ImgRequest(script_name="X/Y/Z plot", alwayson_scripts={"ADetailer": {}})) == []
    assert request_warnings(Img2ImgRequest(alwayson_scripts={"controlnet": {"args": []},
                                                             "soft inpainting": {"args": [True]}},
                                           script_name="SD upscale")) == []


def test_unknown_alwayson_scripts_are_422():
    from backend.core.errors import UserError
    from backend.core.scripts_catalog import check_alwayson_names

    with pytest.raises(UserError) as err:
        check_alwayson_names({"ADetailer": {"args": []}}, "txt2img")
    assert err.value.status == 422 and "always on script ADetailer not found" in err.value.message
    with pytest.raises(UserError) as err:  # soft inpainting is an img2img script, as in A1111
        check_alwayson_names({"Soft Inpainting": {"args": [True]}}, "txt2img")
    assert err.value.status == 422
    with pytest.raises(UserError) as err:
        check_alwayson_names({"Prompt matrix": {"args": []}}, "img2img")
    assert "selectable script" in err.value.message
    check_alwayson_names({"ControlNet": {"args": []}, "soft inpainting": {"args": [True]}}, "img2img")


def test_unused_flags_are_warned_about():
    assert flag_warnings(parse_args([])) == []
    # flags that act: no warning
    assert flag_warnings(parse_args(["--api", "--medvram", "--port", "7000", "--theme", "dark",
                                     "--enable-insecure-extension-access", "--styles-file", "styles.csv"])) == []
    args = parse_args(["--lowram", "--upcast-sampling", "--skip-load-model-at-start", "--skip-torch-cuda-test"])
    text = "\n".join(flag_warnings(args))
    for flag in ("--lowram", "--upcast-sampling", "--skip-load-model-at-start",
                 "--skip-torch-cuda-test"):
        assert flag in text, flag
    for dest in IGNORED_FLAGS:  # every listed flag exists in the parser (a renamed flag would never warn)
        assert hasattr(args, dest), dest


def test_app_logs_the_warnings_at_start(caplog):
    import app
    with caplog.at_level(logging.WARNING, logger="easel"):
        app.warn_ignored_flags(parse_args(["--lowram", "--api"]))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "--lowram" in caplog.records[0].getMessage()


def test_api_names_ignored_fields_in_info_warnings(api):
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    r = api.post("/txt2img", json=dict(body, firstphase_width=512, firstphase_height=512))
    assert r.status_code == 200, r.text
    warnings = json.loads(r.json()["info"]).get("warnings", [])
    assert any(w.startswith("firstphase_width ") for w in warnings), warnings
    assert any(w.startswith("firstphase_height ") for w in warnings), warnings
    r = api.post("/txt2img", json=body)  # nothing ignored was set: no such warning
    assert r.status_code == 200, r.text
    warnings = json.loads(r.json()["info"]).get("warnings", [])
    assert not any("ignored" in w for w in warnings), warnings


def test_force_task_id_is_the_id_progress_reports(api, server):
    """A1111's force_task_id: the id under which the job's progress is reported (`current_task`), not a warning."""
    assert request_warnings(Txt2ImgRequest(force_task_id="task(abc)")) == []
    body = {"prompt": "a cat", "steps": 150, "n_iter": 4, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}, "force_task_id": "task(easel-test)"}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + "/sdapi/v1/txt2img", json=body,
                                                                   timeout=600)))
    t.start()
    try:
        deadline = time.monotonic() + 120
        seen = None
        while time.monotonic() < deadline and t.is_alive() and seen is None:
            seen = api.get("/progress").json()["current_task"]
            time.sleep(0.02)
        assert seen == "task(easel-test)", seen
    finally:
        api.post("/interrupt")
        t.join(120)
    assert result["r"].status_code == 200, result["r"].text
    assert api.get("/progress").json()["current_task"] is None  # the job has ended


def test_theme_flag_opens_the_ui_in_that_theme(tmp_path_factory):
    """--theme dark (as A1111): the page reloads itself with ?__theme=dark and Gradio draws it dark; an address
    that names a theme keeps it."""
    from browser import browser_page
    from conftest import Server

    with Server(tmp_path_factory.mktemp("theme"), ["--theme", "dark"]) as srv, browser_page(srv.url + "/") as page:
        page.wait_for_url("**__theme=dark**")
        page.wait_for_function("() => document.querySelector('.dark') !== null")
        page.goto(srv.url + "/?__theme=light")
        page.wait_for_selector("#txt2img_prompt")
        assert "__theme=light" in page.url
        assert page.evaluate("() => document.querySelector('.dark') === null")
