"""One gate for every settings change: the options API and a job's override_settings are checked alike.

Unit tests of `Options.check`, then the real server: output folders and file formats smuggled through
`override_settings`, bad values, and `--freeze-settings` / `--hide-ui-dir-config`.
"""
from __future__ import annotations

import base64
import io
import json
import math
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from backend.core.errors import UserError
from backend.core.options import OUTPUT_DIR_KEYS, PER_JOB_WHEN_FROZEN, Options
from conftest import Server

CKPT = "tiny-sd1.safetensors"

BAD_VALUES = [
    ("CLIP_stop_at_last_layers", "abc"),
    ("CLIP_stop_at_last_layers", 999),
    ("CLIP_stop_at_last_layers", 2.5),
    ("CLIP_stop_at_last_layers", True),
    ("CLIP_stop_at_last_layers", [2]),
    ("CLIP_stop_at_last_layers", None),
    ("samples_format", "txt"),
    ("samples_format", "png/../../x"),
    ("samples_format", 5),
    ("eta_ancestral", math.nan),
    ("eta_ancestral", math.inf),
    ("eta_ancestral", "Infinity"),
    ("eta_ancestral", "1e400"),
    ("eta_ddim", {"a": 1}),
    ("live_previews_enable", "maybe"),
    ("live_previews_enable", 2),
    ("sd_checkpoints_limit", 10 ** 400),
    ("samples_filename_pattern", "../../[seed]"),
    ("samples_filename_pattern", "/tmp/[seed]"),
    ("directories_filename_pattern", "..\\..\\x"),
    ("samples_filename_pattern", "a\x00b"),
    ("outdir_txt2img_samples", "outputs/a\x00b"),
    ("outdir_txt2img_samples", ["outputs/x"]),
]


# -- the gate itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_values_are_refused_naming_the_setting_and_never_stored(tmp_path, key, value):
    path = tmp_path / "config.json"
    opts = Options(path, tmp_path)
    opts.update({"sd_checkpoints_limit": 3})
    before = path.read_bytes()
    for per_job in (False, True):
        with pytest.raises(UserError) as err:
            opts.check({key: value}, per_job=per_job)
        assert key in err.value.message and 400 <= err.value.status < 500
    with pytest.raises(UserError):
        opts.update({"sd_checkpoints_limit": 4, key: value})
    assert path.read_bytes() == before
    assert opts["sd_checkpoints_limit"] == 3


@pytest.mark.parametrize("key,value,expected", [
    ("CLIP_stop_at_last_layers", "2", 2),
    ("CLIP_stop_at_last_layers", 2.0, 2),
    ("eta_ancestral", "0.5", 0.5),
    ("eta_ancestral", 0, 0.0),
    ("live_previews_enable", "false", False),
    ("live_previews_enable", 1, True),
    ("samples_format", "jpg", "jpg"),
    ("samples_filename_pattern", "[seed]-[prompt_words]", "[seed]-[prompt_words]"),
    ("directories_filename_pattern", "[date]/mine", "[date]/mine"),
    ("outdir_txt2img_samples", "outputs/mine", "outputs/mine"),
])
def test_values_are_coerced_as_the_setting_holds_them(tmp_path, key, value, expected):
    got = Options(tmp_path / "config.json", tmp_path).check({key: value})[key]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key", OUTPUT_DIR_KEYS)
@pytest.mark.parametrize("folder", ["/any/folder", "../../x", "outputs/../../x", "outputs/../models"])
def test_output_folders_outside_outputs_are_refused_for_jobs_too(tmp_path, key, folder):
    opts = Options(tmp_path / "config.json", tmp_path)
    for per_job in (False, True):
        with pytest.raises(UserError) as err:
            opts.check({key: folder, "save_to_dirs": False}, per_job=per_job)
        assert err.value.status == 403 and key in err.value.message


def test_frozen_settings_allow_only_generation_parameters_per_job(tmp_path):
    path = tmp_path / "config.json"
    opts = Options(path, tmp_path, frozen=True)
    job = opts.check({"CLIP_stop_at_last_layers": "2", "eta_ancestral": 0.5, "no_such_setting_here": 31337},
                     per_job=True)
    assert job == {"CLIP_stop_at_last_layers": 2, "eta_ancestral": 0.5}  # keys that are no setting: left out
    # the sampler noise settings a pasted infotext carries (ENSD, RNG, Sigma churn...) are generation parameters too
    assert opts.check({"eta_noise_seed_delta": "31337", "randn_source": "NV", "s_churn": 0.5}, per_job=True) == \
        {"eta_noise_seed_delta": 31337, "randn_source": "NV", "s_churn": 0.5}
    for changes, per_job in (({"samples_format": "jpg"}, True), ({"save_to_dirs": False}, True),
                             ({"outdir_txt2img_samples": "outputs/mine"}, True),
                             ({"CLIP_stop_at_last_layers": 2}, False), ({"my_extension_key": 1}, False)):
        with pytest.raises(UserError) as err:
            opts.update(changes) if not per_job else opts.check(changes, per_job=True)
        assert err.value.status == 403 and "--freeze-settings" in err.value.message
        assert next(iter(changes)) in err.value.message
    assert not path.exists()
    # posting back the whole options dict changes nothing, so it passes (as in A1111)
    assert opts.update(opts.as_dict()) == opts.as_dict()
    assert set(PER_JOB_WHEN_FROZEN) >= {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"}


def test_hidden_dir_config_refuses_output_folder_changes(tmp_path):
    opts = Options(tmp_path / "config.json", tmp_path, hide_dir_config=True)
    for key in OUTPUT_DIR_KEYS:
        for per_job in (False, True):
            with pytest.raises(UserError) as err:
                opts.check({key: "outputs/inside-but-new"}, per_job=per_job)
            assert err.value.status == 403 and "--hide-ui-dir-config" in err.value.message
    assert opts.check({"outdir_txt2img_samples": opts["outdir_txt2img_samples"]}, per_job=True)
    assert opts.update({"samples_format": "webp"}) == {"samples_format": "webp"}


def test_value_checks_resolve_names_and_name_the_setting(tmp_path):
    opts = Options(tmp_path / "config.json", tmp_path)

    def title(value):
        if value != "known":
            raise UserError(f"Checkpoint {value!r} not found.", status=404)
        return "known.safetensors [abc]"

    opts.add_value_check("sd_model_checkpoint", title)
    assert opts.update({"sd_model_checkpoint": "known"}) == {"sd_model_checkpoint": "known.safetensors [abc]"}
    with pytest.raises(UserError) as err:
        opts.check({"sd_model_checkpoint": "nope"}, per_job=True)
    assert err.value.status == 404 and "sd_model_checkpoint" in err.value.message
    assert opts["sd_model_checkpoint"] == "known.safetensors [abc]"


# -- through the real server ------------------------------------------------------------------------

def _txt2img(**kw) -> dict:
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5,
            "save_images": True}
    body.update(kw)
    body["override_settings"] = {"sd_model_checkpoint": CKPT, **body.get("override_settings", {})}
    return body


def _img2img(**kw) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return _txt2img(init_images=[base64.b64encode(buf.getvalue()).decode()], denoising_strength=0.5, **kw)


def _post(api: httpx.Client, route: str, body: dict) -> httpx.Response:
    """POST `body` as JSON, NaN and Infinity written as the literals Python's JSON reader (and A1111's) accepts."""
    return api.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _escape_targets(data_dir: Path, tmp_path: Path) -> list[tuple[str, Path]]:
    """An absolute folder outside the data dir, and a relative one that climbs out of it."""
    name = f"easel-escape-{uuid.uuid4().hex[:8]}"
    return [(str(tmp_path / name), tmp_path / name), (f"../../{name}", (data_dir / ".." / ".." / name).resolve())]


ROUTES = [("outdir_txt2img_samples", "/txt2img", {}), ("outdir_txt2img_grids", "/txt2img", {"batch_size": 2}),
          ("outdir_img2img_samples", "/img2img", {}), ("outdir_img2img_grids", "/img2img", {"batch_size": 2}),
          ("outdir_init_images", "/img2img", {"override_settings": {"save_init_img": True}})]


@pytest.mark.parametrize("key,route,extra", ROUTES)
def test_override_settings_cannot_write_outside_outputs(server, api, tmp_path, key, route, extra):
    config = server.data_dir / "config.json"
    before = config.read_bytes() if config.exists() else None
    for value, target in _escape_targets(server.data_dir, tmp_path):
        make = _img2img if route == "/img2img" else _txt2img
        overrides = {key: value, "save_to_dirs": False, **extra.get("override_settings", {})}
        body = make(**{k: v for k, v in extra.items() if k != "override_settings"}, override_settings=overrides)
        for keep in (True, False):
            r = api.post(route, json=dict(body, override_settings_restore_afterwards=keep))
            assert r.status_code == 403, r.text
            assert key in r.json()["detail"]
            assert not target.exists(), f"{route} wrote {_files_under(target)}"
    assert (config.read_bytes() if config.exists() else None) == before


@pytest.mark.parametrize("fmt", ["txt", "png/../../x", "py"])
def test_override_settings_cannot_pick_a_file_type(server, api, fmt):
    outputs = server.data_dir / "outputs"
    before = set(_files_under(outputs))  # the server is shared: other tests' files (Save's log.csv, a zip) stay out
    r = api.post("/txt2img", json=_txt2img(override_settings={"samples_format": fmt}))
    assert r.status_code == 400, r.text
    assert "samples_format" in r.json()["detail"]
    assert not [p for p in set(_files_under(outputs)) - before if p.suffix not in (".png", ".jpg", ".webp")]
    assert not [p for p in _files_under(server.data_dir) if p.name == "x"]


@pytest.mark.parametrize("key,value", [("CLIP_stop_at_last_layers", "abc"), ("CLIP_stop_at_last_layers", 999),
                                       ("eta_ancestral", math.nan), ("eta_ancestral", math.inf),
                                       ("samples_format", "png/../../x"), ("live_previews_enable", [1]),
                                       ("samples_filename_pattern", "../../[seed]")])
def test_bad_values_get_4xx_naming_the_setting_from_jobs_and_the_options_api(server, api, key, value):
    config = server.data_dir / "config.json"
    before = config.read_bytes() if config.exists() else None
    options_before = api.get("/options").json()
    for keep in (True, False):
        r = _post(api, "/txt2img", _txt2img(override_settings={key: value}, override_settings_restore_afterwards=keep))
        # NaN/Infinity are refused anywhere in a request body at its edge (422, backend.core.safe_values), before the gate
        assert r.status_code == (422 if isinstance(value, float) and not math.isfinite(value) else 400), r.text
        assert key in r.json()["detail"]
    r = _post(api, "/options", {key: value})
    assert r.status_code == 400, r.text
    assert key in r.json()["detail"]
    assert (config.read_bytes() if config.exists() else None) == before
    assert api.get("/options").json() == options_before


def test_jobs_see_the_checked_values(server, api):
    r = api.post("/txt2img", json=_txt2img(save_images=False, override_settings={"CLIP_stop_at_last_layers": "2"}))
    assert r.status_code == 200, r.text
    assert "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
    assert api.get("/options").json()["CLIP_stop_at_last_layers"] == 1  # restored afterwards (the default)


def test_kept_overrides_are_stored_coerced(server, api):
    try:
        r = api.post("/txt2img", json=_txt2img(save_images=False, override_settings={"CLIP_stop_at_last_layers": "2"},
                                               override_settings_restore_afterwards=False))
        assert r.status_code == 200, r.text
        assert api.get("/options").json()["CLIP_stop_at_last_layers"] == 2
        assert json.loads((server.data_dir / "config.json").read_text())["CLIP_stop_at_last_layers"] == 2
    finally:
        api.post("/options", json={"CLIP_stop_at_last_layers": 1})


@pytest.fixture(scope="module")
def locked(tmp_path_factory, tiny_models):
    """A server started with --freeze-settings --hide-ui-dir-config."""
    with Server(tmp_path_factory.mktemp("easel-locked"), ["--freeze-settings", "--hide-ui-dir-config"],
                models={"sd1": tiny_models["sd1"]}) as srv:
        with httpx.Client(base_url=srv.url + "/sdapi/v1", timeout=600) as client:
            yield srv, client


def test_frozen_server_refuses_stored_changes_and_folder_overrides(locked, tmp_path):
    srv, api = locked
    config = srv.data_dir / "config.json"
    before = config.read_bytes() if config.exists() else None
    outputs = srv.data_dir / "outputs"
    for key in OUTPUT_DIR_KEYS:  # even a folder inside outputs: output folders are not the UI's business here
        for value in ("outputs/elsewhere", str(tmp_path / "abs")):
            r = api.post("/txt2img", json=_txt2img(override_settings={key: value, "save_to_dirs": False}))
            assert r.status_code == 403, r.text
            assert key in r.json()["detail"]
    assert not (outputs / "elsewhere").exists() and not (tmp_path / "abs").exists()
    for body in ({"CLIP_stop_at_last_layers": 2}, {"samples_format": "jpg"}, {"outdir_txt2img_samples": "outputs/x"}):
        r = api.post("/options", json=body)
        assert r.status_code == 403, r.text
        assert next(iter(body)) in r.json()["detail"]
    r = api.post("/txt2img", json=_txt2img(override_settings={"samples_format": "jpg"}))
    assert r.status_code == 403 and "--freeze-settings" in r.json()["detail"]
    body = dict(_txt2img(), override_settings={"CLIP_stop_at_last_layers": 2}, override_settings_restore_afterwards=False)
    r = api.post("/txt2img", json=body)
    assert r.status_code == 403 and "CLIP_stop_at_last_layers" in r.json()["detail"]
    assert (config.read_bytes() if config.exists() else None) == before
    # the options as read, posted back unchanged (what many A1111 clients do), are no change
    assert api.post("/options", json=api.get("/options").json()).status_code == 200


def test_frozen_server_still_runs_jobs_with_their_generation_parameters(locked):
    srv, api = locked
    r = api.post("/txt2img", json=_txt2img(override_settings={"CLIP_stop_at_last_layers": 2, "eta_ancestral": 0.5,
                                                              "sd_vae": "Automatic"}))
    assert r.status_code == 200, r.text
    assert "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
    assert api.get("/options").json()["CLIP_stop_at_last_layers"] == 1
    saved = _files_under(srv.data_dir / "outputs" / "txt2img-images")
    assert saved and all(p.suffix == ".png" for p in saved)


def test_frozen_server_ui_generates_and_shows_why_settings_do_not_change(locked):
    """The UI sends checkpoint, VAE and clip skip with every job: under --freeze-settings that must still work."""
    from browser import browser_page, set_sizes

    srv, api = locked
    config = srv.data_dir / "config.json"
    before = config.read_bytes() if config.exists() else None
    with browser_page(srv.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a blue door")
        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        page.get_by_role("tab", name="Settings").click()
        box = page.locator("#settings_sd_checkpoints_limit input[type=number]")
        box.fill("5")
        box.press("Enter")
        page.click("#settings_submit")
        page.wait_for_function("document.querySelector('#settings_result').innerText.includes('--freeze-settings')")
    assert (config.read_bytes() if config.exists() else None) == before
