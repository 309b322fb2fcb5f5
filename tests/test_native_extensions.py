"""Easel's native extension API (backend/core/native_extensions.py, docs/extensions.md): `easel_extension.py`
with `register(registry)`; the built-in extensions ControlNet and soft inpainting use it; a native test extension
in a data dir's `extensions/` adds an always-on script whose sampling hook changes the pictures, a job kind, a
setting, a router and a UI part; disabling ControlNet removes its always-on script (422 as in A1111), routes and accordion."""
from __future__ import annotations

import base64
import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from backend.core import extensions as core_ext
from backend.core.cmd_args import parse_args
from backend.core.native_extensions import ExtensionRegistry, load_extension_file, load_registry
from backend.core.options import Options
from backend.extensions import enabled_extensions
from tests.conftest import Server
from tests.native_test_extension import write as write_native_extension


def _builtin_registry(flags=(), disabled=()):
    options = SimpleNamespace(get=lambda key, default=None: list(disabled) if key == "disabled_extensions" else default)
    args = parse_args(list(flags))
    paths = SimpleNamespace(data_dir=None)
    return load_registry(enabled_extensions(paths, options, args))


def test_builtin_extensions_register_controlnet_and_soft_inpainting():
    registry = _builtin_registry()
    assert {"controlnet", "soft-inpainting"} <= set(registry.loaded)
    assert registry.engine_scripts()["controlnet"] == "backend.engine.controlnet.script"
    assert registry.engine_scripts()["soft inpainting"] == "backend.engine.soft_inpainting"
    assert registry.alwayson_tabs()["controlnet"] is True and registry.alwayson_tabs()["soft inpainting"] is False
    assert registry.script_jobs()["controlnet_detect"] == ("controlnet", "detect")
    assert [t.title for t in registry.tabs] == ["ControlNet"] and "controlnet" in registry.components
    assert len(registry.routers) == 1 and len(registry.generation_ui) == 2
    assert len(registry.xyz_axes) == 1  # ControlNet's X/Y/Z axes
    # the engine reads the same files: its tables and the worker's job table come from them
    from backend.engine import always_on, worker
    assert always_on.ENGINE_SCRIPTS["controlnet"] == "backend.engine.controlnet.script"
    assert always_on.SCRIPT_JOBS["controlnet_detect"] == ("controlnet", "detect")
    assert "controlnet_detect" in worker.JOB_HANDLERS


def test_disable_flags_follow_a1111():
    """A1111: --disable-all-extensions turns the built-in ones off too, --disable-extra-extensions keeps them."""
    assert _builtin_registry(["--disable-all-extensions"]).always_on == []
    assert {"controlnet", "soft-inpainting"} <= set(_builtin_registry(["--disable-extra-extensions"]).loaded)
    assert "controlnet" not in _builtin_registry(disabled=["controlnet"]).alwayson_tabs()


def test_a_broken_extension_is_skipped_with_its_name_and_leaves_nothing_behind(tmp_path, caplog):
    folder = tmp_path / "half-done"
    folder.mkdir()
    (folder / "easel_extension.py").write_text(
        "def register(registry):\n"
        "    registry.add_component('half', lambda service: 1)\n"
        "    registry.add_always_on_script('half', app=lambda s: None, engine='x.y')\n"
        "    raise RuntimeError('not finished')\n")
    registry = ExtensionRegistry()
    with caplog.at_level(logging.ERROR, logger="easel.extensions"):
        assert load_extension_file(folder / "easel_extension.py", "half-done", registry) is False
    assert "extension half-done skipped: RuntimeError: not finished" in caplog.text
    assert registry.always_on == [] and registry.components == {} and registry.loaded == []
    # an engine file outside the extension's folder is refused
    (folder / "easel_extension.py").write_text(
        "def register(registry):\n"
        "    registry.add_always_on_script('escape', app=lambda s: None, engine='../elsewhere.py')\n")
    assert load_extension_file(folder / "easel_extension.py", "half-done", registry) is False
    assert "is not a file in the extension" in caplog.text


@pytest.fixture(scope="module")
def native_server(tmp_path_factory, tiny_models):
    """A server with the native test extension in DATA_DIR/extensions and ControlNet disabled in the Extensions
    tab's list."""
    data_dir = tmp_path_factory.mktemp("easel-native-data")
    write_native_extension(data_dir / "extensions")
    (data_dir / "config.json").write_text(json.dumps({"disabled_extensions": ["controlnet"]}))
    with Server(data_dir, models=tiny_models) as srv:
        yield srv


@pytest.fixture(scope="module")
def native_api(native_server):
    import httpx
    with httpx.Client(base_url=native_server.url, timeout=600) as client:
        yield client


def _pixels(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["images"][0]))).convert("RGB")).astype(int)


def test_native_always_on_script_changes_the_pixels_through_the_api(native_api):
    body = {"prompt": "a red barn", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    plain = _pixels(native_api.post("/sdapi/v1/txt2img", json=body))
    inverted = _pixels(native_api.post("/sdapi/v1/txt2img",
                                       json={**body, "alwayson_scripts": {"Native Invert": {"args": [True]}}}))
    assert plain.std() > 0
    assert np.array_equal(inverted, 255 - plain)  # the extension's after_decode hook ran on the job's picture
    assert "Native invert: True" in native_api.post("/sdapi/v1/txt2img", json={
        **body, "alwayson_scripts": {"native invert": {"args": [True]}}}).json()["info"]
    off = _pixels(native_api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"native invert": {"args": [False]}}}))
    assert np.array_equal(off, plain)
    bad = native_api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"native invert": {"args": ["yes"]}}})
    assert bad.status_code in (400, 422) and "native invert: args must be a list of booleans" in bad.text


def test_native_router_component_and_job_kind(native_api):
    assert native_api.get("/native-test/greeting").json() == {"greeting": "hello from native-test"}
    first = native_api.post("/native-test/double", params={"n": 21}).json()
    second = native_api.post("/native-test/double", params={"n": 1}).json()
    # run in the backend by the extension's engine file, whose runtime is kept between jobs
    assert first == {"double": 42, "calls": 1} and second == {"double": 2, "calls": 2}


def test_native_setting_passes_the_settings_gate(native_api):
    assert native_api.get("/sdapi/v1/options").json()["native_test_factor"] == 2
    bad = native_api.post("/sdapi/v1/options", json={"native_test_factor": 99})
    assert bad.status_code == 400 and "native_test_factor" in bad.text, bad.text
    assert native_api.post("/sdapi/v1/options", json={"native_test_factor": 3}).status_code == 200
    assert native_api.post("/native-test/double", params={"n": 5}).json()["double"] == 15
    native_api.post("/sdapi/v1/options", json={"native_test_factor": 2})


def test_disabled_controlnet_is_gone_from_api_and_ui(native_api):
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
            "alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "module": "none", "model": "None"}]}}}
    resp = native_api.post("/sdapi/v1/txt2img", json=body)
    assert resp.status_code == 422 and "always on script controlnet not found" in resp.text, resp.text
    assert "The extension controlnet is disabled" in resp.text
    assert native_api.get("/controlnet/version").status_code == 404
    listed = native_api.get("/sdapi/v1/scripts").json()  # always-on scripts are listed, as A1111 lists them
    assert "native invert" in listed["txt2img"] and "soft inpainting" in listed["img2img"]
    assert "soft inpainting" not in listed["txt2img"]
    assert "controlnet" not in listed["txt2img"] + listed["img2img"]
    xyz_types = [i["args"][0]["choices"] for i in native_api.get("/sdapi/v1/script-info").json()
                 if i["name"] == "x/y/z plot"]  # nor ControlNet's X/Y/Z axes
    assert len(xyz_types) == 2 and all("Steps" in c and not any("ControlNet" in a for a in c) for c in xyz_types)
    # soft inpainting (another built-in extension) is still on
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(picture, format="PNG")
    unknown = native_api.post("/sdapi/v1/img2img", json={
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "init_images": [base64.b64encode(picture.getvalue()).decode()],
        "alwayson_scripts": {"nope": {"args": []}}})
    assert unknown.status_code == 422 and "soft inpainting" in unknown.text and "controlnet" not in unknown.text
    config = native_api.get("/config").json()
    elem_ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "txt2img_native_invert" in elem_ids and "img2img_soft_inpainting" in elem_ids
    assert not {"txt2img_controlnet", "img2img_controlnet", "controlnet_detect_run"} & elem_ids
    # A1111's API lists no built-in extension; the Extensions tab shows ControlNet, off
    assert {e["name"]: e["enabled"] for e in native_api.get("/sdapi/v1/extensions").json()} == {"native-test": True}
    table = next(c["props"]["value"] for c in config["components"]
                 if c.get("props", {}).get("elem_id") == "extensions_table")
    row = table.split('<tr data-extension="controlnet">')[1].split("</tr>")[0]
    assert "controlnet (built-in)" in row and "<td>disabled</td>" in row
    assert '<tr data-extension="soft-inpainting"><td>soft-inpainting (built-in)' in table


def test_browser_native_panel_and_no_controlnet_accordion(native_server):
    """The extension's panel under txt2img: its checkbox switches its always-on script on for Generate; ControlNet's
    accordion is absent (its extension is disabled; the page's config is checked in the test above)."""
    from browser import browser_page, set_sizes

    with browser_page(native_server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        assert page.locator("#txt2img_native_invert").count() == 1
        assert page.locator("#txt2img_controlnet").count() == 0
        page.fill("#txt2img_prompt textarea", "a quiet harbour")
        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_native_invert")  # open the extension's accordion
        page.locator("#txt2img_native_invert_enabled input[type=checkbox]").click()
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        assert "Native invert: True" in page.inner_text("#txt2img_info")
