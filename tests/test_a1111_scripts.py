"""AUTOMATIC1111 scripts from an extension, run unchanged through the compatibility layer (`modules/`): listed,
chosen by `script_name` with positional `script_args`, always-on ones through `alwayson_scripts`, broken files
skipped with a log line; a script that raises fails its job naming it, and the server serves on."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from a1111_test_extension import write_test_extensions
from conftest import ROOT, Server
from test_api_img2img import SD1


def txt(**kw) -> dict:
    b = {"prompt": "a red boat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7,
         "seed": 11, "override_settings": {"sd_model_checkpoint": SD1}}
    b.update(kw)
    return b


def answer(resp) -> tuple[list[np.ndarray], dict]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")).astype(int)
              for s in data["images"]]
    return images, json.loads(data["info"])


@pytest.fixture(scope="module")
def ext_server(tmp_path_factory, tiny_models):
    data_dir = tmp_path_factory.mktemp("easel-ext-data")
    write_test_extensions(data_dir)
    with Server(data_dir, models=tiny_models) as srv:
        yield srv


@pytest.fixture(scope="module")
def ext_api(ext_server):
    import httpx
    with httpx.Client(base_url=ext_server.url + "/sdapi/v1", timeout=600) as client:
        yield client


def test_listed_with_their_ui_controls_as_args(ext_api):
    scripts = ext_api.get("/scripts").json()
    for tab in ("txt2img", "img2img"):
        assert "test steps override" in scripts[tab] and "test raiser" in scripts[tab]
        assert "broken script" not in scripts[tab]
        assert "test invert" in scripts[tab]  # always-on scripts are listed too, as A1111 lists them
    infos = ext_api.get("/script-info").json()
    invert = [i for i in infos if i["name"] == "test invert"]
    assert len(invert) == 2 and all(i["is_alwayson"] for i in invert)
    assert invert[0]["args"][0]["label"] == "Invert the picture"
    info = [i for i in infos if i["name"] == "test steps override"]
    assert len(info) == 2
    args = info[0]["args"]
    assert args[0] == {"label": "Override steps", "value": 3, "minimum": 1, "maximum": 20, "step": 1, "choices": None}
    assert args[1]["label"] == "Shout the prompt" and args[1]["value"] is False


def test_run_changes_p_and_process_images_runs_the_pipeline(ext_api):
    images, info = answer(ext_api.post("/txt2img", json=txt(script_name="Test steps override", script_args=[4, True])))
    assert len(images) == 1
    text = info["infotexts"][0]
    assert text.startswith("A RED BOAT\n")
    assert "Steps: 4," in text and "Test override: steps 4" in text and "Test format: png" in text
    # defaults fill missing trailing script_args, as A1111
    _, info = answer(ext_api.post("/txt2img", json=txt(script_name="test steps override", script_args=[])))
    assert "Steps: 3," in info["infotexts"][0] and info["infotexts"][0].startswith("a red boat\n")


def test_img2img_script_gets_the_init_image(ext_api):
    from test_api_img2img import body, picture

    req = body(picture(64, 64), prompt="a red boat", steps=4, denoising_strength=0.5, seed=11,
               script_name="Test steps override", script_args=[2, False],
               override_settings={"sd_model_checkpoint": SD1})
    images, info = answer(ext_api.post("/img2img", json=req))
    assert len(images) == 1 and images[0].shape == (64, 64, 3)
    assert "Steps: 2," in info["infotexts"][0] and "Test override: steps 2" in info["infotexts"][0]
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    # the always-on script can't be chosen as the selectable one
    r = ext_api.post("/img2img", json=dict(req, script_name="Test invert", script_args=[True]))
    assert r.status_code == 422


def test_bad_script_args_are_refused_at_the_edge(ext_api):
    r = ext_api.post("/txt2img", json=txt(script_name="Test steps override", script_args=[50]))
    assert r.status_code == 422 and "override steps" in r.text.lower()


def test_always_visible_process_and_postprocess_image(ext_api):
    plain, _ = answer(ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test invert": {"args": [False]}})))
    inverted, info = answer(ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test invert": {"args": [True]}})))
    assert np.array_equal(inverted[0], 255 - plain[0])
    assert "Test invert: True" in info["infotexts"][0]
    # with a selectable script: its generations get the always-on script too
    both, info = answer(ext_api.post("/txt2img", json=txt(script_name="Test steps override", script_args=[2],
                                                          alwayson_scripts={"test invert": {"args": [True]}})))
    assert np.array_equal(both[0], 255 - plain[0])
    assert "Test override: steps 2" in info["infotexts"][0] and "Test invert: True" in info["infotexts"][0]


def test_on_cfg_denoiser_callback_changes_sampling(ext_api):
    # the callback runs in every job (no script of its file used), as A1111's; its extension's setting decides
    plain, _ = answer(ext_api.post("/txt2img", json=txt()))
    silenced, _ = answer(ext_api.post("/txt2img", json=txt(override_settings={"sd_model_checkpoint": SD1,
                                                                              "easel_test_silence": True})))
    assert np.abs(silenced[0] - plain[0]).mean() > 1
    again, _ = answer(ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test silence": {"args": [True]}})))
    assert np.array_equal(again[0], plain[0])


def test_unknown_always_on_name_is_422(ext_api):
    r = ext_api.post("/txt2img", json=txt(alwayson_scripts={"Broken script": {"args": []}}))
    assert r.status_code == 422


def test_script_that_raises_fails_its_job_and_the_server_serves_on(ext_api):
    r = ext_api.post("/txt2img", json=txt(script_name="Test raiser", script_args=["no thanks"]))
    assert r.status_code >= 400
    assert "Test raiser" in r.text and "the test script refuses: no thanks" in r.text
    images, _ = answer(ext_api.post("/txt2img", json=txt()))
    assert len(images) == 1


def test_broken_extension_scripts_are_skipped_with_a_log_line(ext_server):
    import httpx
    assert httpx.get(ext_server.url + "/", timeout=60).status_code == 200  # the UI loads
    log = ext_server.log_path.read_text(errors="replace")
    assert "needs_missing.py" in log and "sd_model" in log
    assert "import_error.py" in log and "no_such_package_for_easel_tests" in log
    assert "on_ui_tabs of extension broken-ext (ui_tabs.py)" in log and "the test tab is broken" in log
    assert "callback_only.py" not in log  # a file with callbacks and no Script loads: they run in every job
    # AlwaysVisible scripts overriding the per-batch and end-of-job methods load (they run where A1111 runs them)
    assert "batch_hooks.py" not in log and "test batch hooks" in ext_server_scripts(ext_server)["txt2img"]


def ext_server_scripts(srv) -> dict:
    import httpx
    return httpx.get(srv.url + "/sdapi/v1/scripts", timeout=60).json()


def test_always_on_in_img2img(ext_api):
    from test_api_img2img import body, picture

    req = body(picture(64, 64), steps=4, denoising_strength=0.5, seed=11)
    plain, _ = answer(ext_api.post("/img2img", json=dict(req, alwayson_scripts={"Test invert": {"args": [False]}})))
    inverted, info = answer(ext_api.post("/img2img", json=dict(req, alwayson_scripts={"Test invert": {"args": [True]}})))
    assert np.array_equal(inverted[0], 255 - plain[0]) and "Test invert: True" in info["infotexts"][0]


def test_layer_names_what_it_lacks_and_imports_no_torch():
    code = (
        "import sys\n"
        "import modules.scripts, modules.processing, modules.shared, modules.images, modules.script_callbacks\n"
        "import modules.script_loading, backend.a1111_scripts\n"
        "import modules.devices, modules.sd_models, modules.ui_components\n"
        "try:\n    modules.shared.sd_model\nexcept AttributeError as e:\n    print('ERR', e)\n"
        "try:\n    modules.shared.opts.samples_format\nexcept RuntimeError as e:\n    print('CTX', e)\n"
        "try:\n    modules.devices.device\nexcept RuntimeError as e:\n    print('DEV', e)\n"
        "try:\n    modules.ui_components.NoSuchBlock\nexcept AttributeError as e:\n    print('UIC', e)\n"
        "print('TORCH', 'torch' in sys.modules, 'gradio' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR modules.shared.sd_model is not available" in out.stdout
    assert "CTX modules.shared.opts is only available while Easel runs" in out.stdout
    assert "DEV modules.devices.device is only available while Easel runs" in out.stdout
    assert "UIC modules.ui_components.NoSuchBlock is not available" in out.stdout
    assert "TORCH False False" in out.stdout


def test_browser_script_dropdown_and_always_on_accordion(ext_server):
    """The extension's script in the Script dropdown with the controls its ui() returned; the AlwaysVisible one's
    checkbox in its own accordion; Generate runs both."""
    from browser import browser_page, pick_dropdown, set_sizes

    with browser_page(ext_server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a quiet harbour")
        set_sizes(page, steps=2, width=64, height=64)
        assert not page.is_visible("#txt2img_script_test_steps_override_arg1")
        pick_dropdown(page, "#txt2img_script_list", "Test steps override")
        page.wait_for_selector("#txt2img_script_test_steps_override_arg1", state="visible")
        page.click("#txt2img_script_test_steps_override_arg1 input[type=checkbox]")
        page.click("#txt2img_script_test_invert")  # open the always-on script's accordion
        page.locator("#txt2img_script_test_invert_arg0 input[type=checkbox]").click()
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Test override')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert info.startswith("A QUIET HARBOUR\n")
        assert "Steps: 3," in info and "Test override: steps 3" in info and "Test invert: True" in info


def test_request_of_p_is_checked_like_a_request():
    """What a script sets on `p` is checked as the app checks a request before the engine runs it."""
    from backend.core.errors import UserError
    from backend.core.job_options import JobOptions
    from backend.core.schemas import Txt2ImgRequest
    from backend.engine.a1111_bridge import processing_object, request_of

    req = Txt2ImgRequest(prompt="a boat", steps=5, width=64, height=64)
    p = processing_object(req, img2img=False)
    assert request_of(p, req, JobOptions.of({}), "process_images(p)") is req  # nothing changed: the same request
    p.steps, p.prompt = 7, "a ship"
    p.extra_generation_params["X"] = 1
    changed = request_of(p, req, JobOptions.of({}), "process_images(p)")
    assert (changed.steps, changed.prompt, changed.width) == (7, "a ship", 64)
    p.steps = -3
    with pytest.raises(UserError, match="process_images\\(p\\): steps must be between"):
        request_of(p, req, JobOptions.of({}), "process_images(p)")
    p.steps, p.batch_size, p.n_iter = 5, 100, 100
    with pytest.raises(UserError, match="images per job"):
        request_of(p, req, JobOptions.of({}), "process_images(p)")
    with pytest.raises(AttributeError, match="sd_model is not available"):
        p.sd_model


def test_callbacks_go_into_the_registry_of_their_file(tmp_path):
    from modules import script_callbacks
    from modules.script_loading import load_script_file

    script = tmp_path / "ext" / "scripts" / "saver.py"
    script.parent.mkdir(parents=True)
    script.write_text("from modules import script_callbacks\nscript_callbacks.on_image_saved(print)\n"
                      "script_callbacks.on_model_loaded(repr)\n")
    loaded = load_script_file(script)
    assert loaded.callbacks.image_saved == [print] and loaded.callbacks.model_loaded == [repr]
    assert loaded.callbacks.any_backend() and not loaded.callbacks.ui_tabs
    with pytest.raises(RuntimeError, match="must be called when the script file is imported"):
        script_callbacks.on_ui_tabs(list)  # no global list to fall into
    script.write_text("import modules.scripts as scripts\nfrom modules import script_callbacks\n"
                      "script_callbacks.on_cfg_denoiser(print)\n"
                      "class S(scripts.Script):\n    def title(self):\n        return 'S'\n"
                      "BASE = scripts.basedir()\n")
    loaded = load_script_file(script)
    assert loaded.callbacks.cfg_denoiser == [print] and [c.__name__ for c in loaded.classes] == ["S"]
    assert loaded.module.BASE == str(tmp_path / "ext")


def test_always_visible_batch_methods_and_postprocess(ext_api):
    """setup, before_process, process, then per batch before_process_batch / process_batch (with batch_number,
    prompts, seeds, subseeds), postprocess_batch (a BCHW tensor in 0..1, edited in place: the pictures change),
    postprocess_batch_list, and postprocess with the job's Processed (a picture it adds is in the answer)."""
    body = txt(batch_size=2, n_iter=2, alwayson_scripts={"Test batch hooks": {"args": [True]}})
    images, info = answer(ext_api.post("/txt2img", json=body))
    plain, plain_info = answer(ext_api.post("/txt2img", json=txt(batch_size=2, n_iter=2)))
    first = info["index_of_first_image"]
    assert len(images) == len(plain) + 1  # the grid, four pictures and the one postprocess added
    calls = info["infotexts"][-1].split("; ")
    assert calls[:3] == ["setup", "before_process", "process"]
    assert calls[3:7] == ["before_process_batch 0 2 0", "process_batch 0 a red boat in batch 0",
                          "postprocess_batch 0 (2, 3, 64, 64) True", "postprocess_batch_list 0 2"]
    assert calls[7] == "before_process_batch 1 2 2" and calls[8] == "process_batch 1 a red boat in batch 1"
    assert calls[-1] == f"postprocess {len(plain)}"
    assert np.array_equal(images[-1], np.full((8, 8, 3), (1, 2, 3)))
    # the prompts the batch methods changed are the pictures' (their infotexts), the tensor edit their pixels
    assert info["infotexts"][first].startswith("a red boat in batch 0\n")
    assert info["infotexts"][first + 2].startswith("a red boat in batch 1\n")
    for picture, before in zip(images[first:first + 4], plain[plain_info["index_of_first_image"]:]):
        assert picture[..., 0].max() == 0 and before[..., 0].max() > 0
    # disabled: the methods still run (as A1111's), the pictures are the plain job's
    images, info = answer(ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test batch hooks": {"args": [False]}})))
    one, _ = answer(ext_api.post("/txt2img", json=txt()))
    assert len(images) == 1 and np.array_equal(images[0], one[0])


def test_process_rewrites_the_request_on_p(ext_api):
    """Request fields an always-on script sets on p take effect; rewritten p.all_prompts / p.all_seeds give each
    picture its own (Dynamic Prompts' way); a value the edge refuses fails the job naming the script."""
    rewritten, info = answer(ext_api.post("/txt2img", json=txt(
        alwayson_scripts={"Test prompt rewrite": {"args": ["fields"]}})))
    same, same_info = answer(ext_api.post("/txt2img", json=txt(prompt="a green field", steps=3, cfg_scale=5,
                                                               sampler_name="Euler a")))
    assert np.array_equal(rewritten[0], same[0])
    text = info["infotexts"][0]
    assert text.startswith("a green field\n") and "Steps: 3," in text and "Sampler: Euler a," in text
    assert "CFG scale: 5," in text

    _, info = answer(ext_api.post("/txt2img", json=txt(
        batch_size=2, alwayson_scripts={"Test prompt rewrite": {"args": ["all prompts"]}})))
    assert info["all_prompts"] == ["a red boat variant 0", "a red boat variant 1"]
    assert info["all_seeds"] == [1000, 1001]
    assert info["infotexts"][-1].startswith("a red boat variant 1\n") and "Seed: 1001," in info["infotexts"][-1]

    r = ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test prompt rewrite": {"args": ["bad steps"]}}))
    assert 400 <= r.status_code < 500 and "Test prompt rewrite" in r.text and "steps must be" in r.text, r.text
    r = ext_api.post("/txt2img", json=txt(alwayson_scripts={"Test prompt rewrite": {"args": ["bad sampler"]}}))
    assert 400 <= r.status_code < 500 and "Test prompt rewrite" in r.text and "No such sampler" in r.text, r.text
    assert len(answer(ext_api.post("/txt2img", json=txt()))[0]) == 1  # the server serves on


def test_compat_names_in_ui_and_in_a_job(ext_api, ext_server):
    """modules.ui_components (InputAccordion, FormRow, ToolButton) and modules.sd_models in ui() in the app;
    shared.sd_model, p.sd_model, modules.devices and sd_models.select_checkpoint() in a job; shared.state.interrupt()
    stops the job after the batch it was called in."""
    import hashlib

    info = [i for i in ext_api.get("/script-info").json() if i["name"] == "test compat names"][0]
    assert info["is_alwayson"] and [a["label"] for a in info["args"]] == [
        "Compat names", "Checkpoint", "Interrupt after the first batch"]
    choice = next(c for c in info["args"][1]["choices"] if c.startswith(SD1))  # the checkpoints on disk (the app)
    path = ext_server.data_dir / "models" / "Stable-diffusion" / SD1
    title = f"{SD1} [{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}]"
    images, info = answer(ext_api.post("/txt2img", json=txt(
        n_iter=3, alwayson_scripts={"Test compat names": {"args": [True, choice, True]}})))
    assert len(images) == 1 and len(info["infotexts"]) == 1  # interrupted after the first batch
    import re
    seen = re.search(r"Test compat: (.*?), Version", info["infotexts"][0]).group(1).split("|")
    # the job's checkpoint (A1111's title), SD 1.x, the device and dtype the backend runs it with (the CPU here)
    assert seen[:4] == [title, "True", "False", "cpu"] and seen[5] == "True", seen
    assert seen[4] in ("torch.float32", "torch.bfloat16", "torch.float16"), seen
    images, _ = answer(ext_api.post("/txt2img", json=txt(n_iter=2, do_not_save_grid=True, alwayson_scripts={
        "Test compat names": {"args": [True, choice, False]}})))
    assert len(images) >= 2  # the next job is not interrupted
