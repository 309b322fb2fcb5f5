"""AUTOMATIC1111's `modules.script_callbacks` from an extension (tests/a1111_test_extension.py `CALLBACKS`): a tab
from on_ui_tabs in the page, settings from on_ui_settings in /sdapi/v1/options and its gate, a route added by
on_app_started, on_before_image_saved / on_image_saved around each saved picture of a plain job, on_model_loaded
with the checkpoint, on_cfg_denoiser in a plain job; a callback that raises is logged and skipped."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from a1111_test_extension import CALLBACKS, CFG_CALLBACK
from browser import browser_page
from conftest import Server
from test_api_img2img import SD1


@pytest.fixture(scope="module")
def cb_server(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("easel-callbacks-data")
    for name, text in {"easel-callbacks-ext/scripts/callbacks.py": CALLBACKS,
                       "easel-test-ext/scripts/cfg_callback.py": CFG_CALLBACK}.items():
        path = data_dir / "extensions" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip())
    with Server(data_dir, models=tiny_models) as srv:
        yield srv


@pytest.fixture(scope="module")
def cb_api(cb_server):
    with httpx.Client(base_url=cb_server.url + "/sdapi/v1", timeout=600) as client:
        yield client


def txt(**kw) -> dict:
    body = {"prompt": "a red boat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7,
            "seed": 11, "override_settings": {"sd_model_checkpoint": SD1}, "save_images": True}
    body.update(kw)
    return body


def images_of(resp) -> tuple[list[np.ndarray], dict]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    return ([np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")).astype(int)
             for s in data["images"]], json.loads(data["info"]))


def ext_dir(srv) -> Path:
    return srv.data_dir / "extensions" / "easel-callbacks-ext"


def test_model_loaded_with_the_checkpoint_title(cb_api, cb_server):
    import hashlib

    images_of(cb_api.post("/txt2img", json=txt()))  # the first job reads the checkpoint from its file
    path = cb_server.data_dir / "models" / "Stable-diffusion" / SD1
    title = f"{SD1} [{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}]"  # A1111's title: name [short hash]
    lines = (ext_dir(cb_server) / "models.txt").read_text().splitlines()
    assert f"{title}|{path}" in lines, (lines, title)


def test_image_saved_callbacks_see_the_file_and_change_the_infotext(cb_api, cb_server):
    saved_list = ext_dir(cb_server) / "saved.txt"
    before = saved_list.read_text().splitlines() if saved_list.exists() else []
    _, info = images_of(cb_api.post("/txt2img", json=txt(prompt="a red boat [tag]", batch_size=2)))
    new = saved_list.read_text().splitlines()[len(before):]
    assert len(new) == 3  # the two pictures and the grid, each once it is written
    for name in new:
        assert Path(name).is_file() and Path(name).parent.is_relative_to(cb_server.data_dir / "outputs")
    pictures = [Path(n) for n in new if "grid" not in Path(n).name]
    assert len(pictures) == 2
    for path in pictures:
        written = Image.open(path).info["parameters"]
        assert written.endswith(", Test tag: Tagged by the test extension level 3"), written
    # the callback changes what is written, not the job's own answer
    assert "Test tag" not in info["infotexts"][-1]
    # a prompt without the tag: written unchanged
    images_of(cb_api.post("/txt2img", json=txt()))
    last = Path(saved_list.read_text().splitlines()[-1])
    assert "Test tag" not in Image.open(last).info["parameters"]


def test_settings_from_on_ui_settings_in_the_options_api_and_its_gate(cb_api, cb_server):
    options = cb_api.get("/options").json()
    assert options["easel_test_level"] == 3 and options["easel_test_silence"] is False
    assert options["easel_test_tag"] == "Tagged by the test extension"
    r = cb_api.post("/options", json={"easel_test_level": 11})
    assert r.status_code == 400 and "easel_test_level" in r.text and "at most 10" in r.text
    r = cb_api.post("/options", json={"easel_test_level": "many"})
    assert r.status_code == 400 and "easel_test_level" in r.text
    assert cb_api.post("/options", json={"easel_test_level": 7}).status_code == 200
    assert cb_api.get("/options").json()["easel_test_level"] == 7
    config = json.loads((cb_server.data_dir / "config.json").read_text())
    assert config["easel_test_level"] == 7
    # shared.opts reads it in the backend (a job's on_before_image_saved) and in the app (on_app_started's route)
    saved_list = ext_dir(cb_server) / "saved.txt"
    images_of(cb_api.post("/txt2img", json=txt(prompt="a red boat [tag]")))
    last = Path(saved_list.read_text().splitlines()[-1])
    assert Image.open(last).info["parameters"].endswith("level 7")
    assert httpx.get(cb_server.url + "/easel-callbacks-test/ping", timeout=30).json()["level"] == 7
    assert cb_api.post("/options", json={"easel_test_level": 3}).status_code == 200


def test_on_app_started_adds_a_route(cb_server):
    r = httpx.get(cb_server.url + "/easel-callbacks-test/ping", timeout=30)
    assert r.status_code == 200 and r.json()["pong"] is True and r.json()["with_ui"] is True


def test_on_cfg_denoiser_runs_in_a_plain_job(cb_api, cb_server):
    plain, _ = images_of(cb_api.post("/txt2img", json=txt()))
    silenced, _ = images_of(cb_api.post("/txt2img", json=txt(
        override_settings={"sd_model_checkpoint": SD1, "easel_test_silence": True})))
    assert np.abs(silenced[0] - plain[0]).mean() > 1
    log = cb_server.log_path.read_text(errors="replace")
    # the callbacks that raise are logged with their extension and skipped; the jobs went on
    assert "on_cfg_denoiser of extension easel-callbacks-ext (callbacks.py)" in log
    assert "on_before_image_saved of extension easel-callbacks-ext (callbacks.py)" in log
    assert "this callback always fails" in log


def test_tab_and_settings_in_the_browser(cb_server):
    with browser_page(cb_server.url) as page:
        page.get_by_role("tab", name="Callbacks test").click()
        page.locator("#easel_callbacks_tab_text").wait_for(state="visible")
        assert "Hello from the callbacks test tab" in page.locator("#easel_callbacks_tab_text").inner_text()
        page.get_by_role("tab", name="Settings").click()
        # the extension's section in the Settings sidebar (its on_ui_settings section title), as a user picks it
        page.locator("#settings_sections label", has_text="Easel callbacks test").click()
        page.locator("#settings_easel_test_level").wait_for(state="visible")
        assert page.locator("#settings_easel_test_tag textarea, #settings_easel_test_tag input").first.input_value() \
            == "Tagged by the test extension"


def test_registered_setting_takes_its_stored_value_and_passes_the_gate(tmp_path):
    from backend.a1111_scripts import setting_of
    from backend.core.errors import UserError
    from backend.core.options import Options, Setting
    from modules.shared import OptionInfo

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ext_mode": "b", "ext_level": 99}))
    options = Options(config, tmp_path)
    options.register(setting_of("ext_mode", OptionInfo("a", "Mode", None, {"choices": ["a", "b"]},
                                                       section=("ext", "Ext")), "ext"))
    options.register(setting_of("ext_level", OptionInfo(2, "Level", None, {"minimum": 0, "maximum": 5}), "ext"))
    assert options["ext_mode"] == "b"  # the stored value, checked as the setting holds it
    assert options["ext_level"] == 2  # a stored value the setting refuses: its default
    assert options.setting("ext_mode").section == "Ext" and options.setting("ext_level").section == "ext"
    with pytest.raises(UserError, match="ext_mode"):
        options.update({"ext_mode": "c"})
    assert options.check({"ext_level": "4"}, per_job=True) == {"ext_level": 4}  # override_settings pass it too
    with pytest.raises(ValueError, match="Easel's own"):
        options.register(Setting("samples_save", False, "x", "x", bool))


def test_option_onchange_runs_when_the_setting_changes_through_the_gate(tmp_path):
    """OptionInfo.onchange: called (with shared.opts reading the new value) each time the stored value changes
    through the settings gate, not for an unchanged value or another setting; one that raises is logged, skipped."""
    from backend.a1111_scripts import ExtensionScripts
    from backend.core.options import Options

    ext = tmp_path / "extensions" / "onchange-ext"
    (ext / "scripts").mkdir(parents=True)
    seen = tmp_path / "seen.txt"
    (ext / "scripts" / "settings.py").write_text(
        "from modules import script_callbacks, shared\n"
        "def changed():\n"
        f"    open({str(seen)!r}, 'a').write(f'{{shared.opts.ext_size}}\\n')\n"
        "def broken():\n    raise ValueError('onchange fails')\n"
        "def add():\n"
        "    shared.opts.add_option('ext_size', shared.OptionInfo(2, 'Size', None, {'minimum': 1, 'maximum': 9},"
        " onchange=changed, section=('ext', 'Ext')))\n"
        "    shared.opts.add_option('ext_flag', shared.OptionInfo(False, 'Flag', onchange=broken))\n"
        "script_callbacks.on_ui_settings(add)\n")
    options = Options(tmp_path / "config.json", tmp_path)
    scripts = ExtensionScripts([(ext / "scripts" / "settings.py", ext)], options.as_dict())
    scripts.register_settings(options)
    assert not seen.exists()
    options.update({"ext_size": 5})
    options.update({"ext_size": 5, "samples_save": False})  # unchanged: not called again
    options.update({"ext_size": "7"})
    assert seen.read_text().splitlines() == ["5", "7"]
    options.update({"ext_flag": True})  # logged and skipped: the setting is stored
    assert options["ext_flag"] is True
