"""Browser: a page never shows stale settings, and Apply never writes them back.

Another client (the API here) changes a setting or the checkpoint while a page is open; Apply on that page,
before or after a reload, keeps the change in config.json, and the reloaded page generates with the checkpoint
the server has selected and shows it.
"""
from __future__ import annotations

import hashlib
import json
import time

from browser import browser_page, pick_dropdown, set_sizes

SETTING = "sd_checkpoints_limit"  # harmless for the other tests sharing the server


def _config(server) -> dict:
    path = server.data_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _open_settings(page) -> None:
    page.get_by_role("tab", name="Settings").click()
    page.wait_for_selector("#settings_submit")


def _apply(page, expect: str) -> None:
    """Press Apply and wait for its answer (`expect`: a text the answer before it did not hold)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    page.click("#settings_submit")
    try:
        page.wait_for_function(f"document.querySelector('#settings_result').innerText.includes({expect!r})")
    except PlaywrightTimeout:  # name what Apply answered instead
        raise AssertionError(f"Apply answered {page.inner_text('#settings_result')!r}, not {expect!r}") from None


def _slider_value(page, key: str) -> str:
    return page.input_value(f"#settings_{key} input[type=number]")


def test_apply_never_writes_back_what_another_client_changed(server, api):
    original = api.get("/options").json()[SETTING]
    changed = 5 if original != 5 else 4
    try:
        with browser_page(server.url) as page:
            _open_settings(page)
            page.wait_for_function(f"document.querySelector('#settings_{SETTING} input[type=number]')?.value == '{original}'")
            assert api.post("/options", json={SETTING: changed}).status_code == 200  # another client
            _apply(page, "Nothing changed")  # the page still shows the old value: not a change of this user's
            assert _config(server)[SETTING] == changed

            page.reload()
            _open_settings(page)
            page.wait_for_function(f"document.querySelector('#settings_{SETTING} input[type=number]')?.value == '{changed}'")
            _apply(page, "Nothing changed")
            assert _config(server)[SETTING] == changed
            assert api.get("/options").json()[SETTING] == changed

            # a change the user does make is written, and only that one
            box = page.locator(f"#settings_{SETTING} input[type=number]")
            box.fill(str(original))
            box.press("Enter")
            _apply(page, "1 setting(s) changed")
            assert _config(server)[SETTING] == original
    finally:
        api.post("/options", json={SETTING: original})


def test_reloaded_page_generates_with_the_checkpoint_the_server_selected(server, api):
    name = "tiny-sd1_ckpt.ckpt"  # not the first checkpoint, which a page shows when none is selected
    path = server.data_dir / "models" / "Stable-diffusion" / name
    shorthash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    before = api.get("/options").json()["sd_model_checkpoint"]
    try:
        with browser_page(server.url) as page:
            page.wait_for_selector("#txt2img_prompt textarea")
            assert not page.input_value("#setting_sd_model_checkpoint input").startswith(name)
            # another client selects a checkpoint while this page is open
            assert api.post("/options", json={"sd_model_checkpoint": name}).status_code == 200
            assert _config(server)["sd_model_checkpoint"].startswith(name)

            page.reload()
            page.wait_for_function("(n) => document.querySelector('#setting_sd_model_checkpoint input')?.value"
                                   "?.startsWith(n)", arg=name)
            page.fill("#txt2img_prompt textarea", "a red barn")
            set_sizes(page, steps=2, width=64, height=64)
            page.click("#txt2img_generate")
            page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Model hash')",
                                   timeout=180_000)
            assert f"Model hash: {shorthash}" in page.inner_text("#txt2img_info")
            assert _config(server)["sd_model_checkpoint"].startswith(name)

            # the Settings tab shows the checkpoint in use (not an empty field), and Apply keeps it
            _open_settings(page)
            page.wait_for_function("(n) => document.querySelector('#settings_sd_model_checkpoint input')?.value"
                                   "?.startsWith(n)", arg=name)
            _apply(page, "Nothing changed")
            assert _config(server)["sd_model_checkpoint"].startswith(name)
    finally:
        api.post("/options", json={"sd_model_checkpoint": before or "tiny-sd1.safetensors"})


def test_quick_settings_choice_is_saved_and_shown_in_the_settings_tab(server, api):
    name = "tiny-sd1_ckpt.ckpt"
    before = api.get("/options").json()["sd_model_checkpoint"]
    original = api.get("/options").json()[SETTING]
    changed = 7 if original != 7 else 6
    try:
        api.post("/options", json={"sd_model_checkpoint": "tiny-sd1.safetensors"})
        with browser_page(server.url) as page:
            page.wait_for_function("document.querySelector('#setting_sd_model_checkpoint input')?.value"
                                   "?.startsWith('tiny-sd1.safetensors')")
            pick_dropdown(page, "#setting_sd_model_checkpoint", name)
            deadline = time.monotonic() + 120
            while not _config(server).get("sd_model_checkpoint", "").startswith(name):
                assert time.monotonic() < deadline, "the quick settings choice was not saved"
                page.wait_for_timeout(200)
            _open_settings(page)
            page.wait_for_function("(n) => document.querySelector('#settings_sd_model_checkpoint input')?.value"
                                   "?.startsWith(n)", arg=name)
            box = page.locator(f"#settings_{SETTING} input[type=number]")
            box.fill(str(changed))
            box.press("Enter")
            _apply(page, "1 setting(s) changed")  # that one only: the checkpoint chosen above stays
            assert _config(server)["sd_model_checkpoint"].startswith(name)
            assert _config(server)[SETTING] == changed
    finally:
        api.post("/options", json={"sd_model_checkpoint": before or "tiny-sd1.safetensors", SETTING: original})


def _shot(page, tmp_path, name: str) -> None:
    page.set_viewport_size({"width": 1440, "height": 900})
    page.screenshot(path=str(tmp_path / f"{name}.png"))


def test_sidebar_shows_one_section_and_search_filters_by_label_across_sections(server, tmp_path):
    with browser_page(server.url) as page:
        _open_settings(page)
        page.wait_for_selector("#settings_section_stable_diffusion", state="visible")
        page.wait_for_selector("#settings_section_saving_images", state="hidden")  # one section at a time
        _shot(page, tmp_path, "settings_first_section")

        page.locator("#settings_sections label", has_text="Saving images").click()
        page.wait_for_selector("#settings_samples_format", state="visible")
        page.wait_for_selector("#settings_section_stable_diffusion", state="hidden")

        search = page.locator("#settings_search textarea, #settings_search input").first
        search.fill("tile")  # "VAE tile size" (Optimizations) and "Tile size for upscaler models" (Upscaling)
        page.wait_for_selector("#settings_vae_tile_size", state="visible")
        page.wait_for_selector("#settings_ESRGAN_tile", state="visible")
        page.wait_for_selector("#settings_samples_format", state="hidden")  # no "tile" in its label
        page.wait_for_selector("#settings_section_saving_images", state="hidden")  # nothing matches there
        assert page.is_hidden("#settings_vae_tiling") is False  # "Tiled VAE encode/decode" holds "tile" too
        assert page.is_hidden("#settings_auto_vae_precision")  # same section, no match
        _shot(page, tmp_path, "settings_search")

        search.fill("clip skip")
        page.wait_for_selector("#settings_CLIP_stop_at_last_layers", state="visible")
        page.wait_for_selector("#settings_vae_tile_size", state="hidden")

        search.fill("")  # the chosen section again
        page.wait_for_selector("#settings_samples_format", state="visible")
        page.wait_for_selector("#settings_CLIP_stop_at_last_layers", state="hidden")


def test_a_listed_setting_is_at_the_top_and_changing_it_there_stores_it(server, api, tmp_path):
    before = api.get("/options").json()
    listed = ["sd_model_checkpoint", "samples_format"]
    choice = "jpg" if before["samples_format"] != "jpg" else "webp"
    try:
        assert api.post("/options", json={"quicksettings_list": listed}).status_code == 200
        with browser_page(server.url) as page:
            page.wait_for_selector("#setting_samples_format", state="visible")
            page.wait_for_selector("#setting_sd_model_checkpoint", state="visible")
            page.wait_for_selector("#setting_sd_vae", state="hidden")  # not listed any more
            assert page.is_hidden("#setting_CLIP_stop_at_last_layers")
            _shot(page, tmp_path, "quicksettings_top")
            pick_dropdown(page, "#setting_samples_format", choice)
            deadline = time.monotonic() + 60
            while _config(server).get("samples_format") != choice:
                assert time.monotonic() < deadline, "the quick setting was not stored"
                page.wait_for_timeout(200)
            assert api.get("/options").json()["samples_format"] == choice
            _open_settings(page)  # the Settings tab's field follows, and its Apply does not write the old value
            page.locator("#settings_sections label", has_text="Saving images").click()
            page.wait_for_function("(v) => document.querySelector('#settings_samples_format input')?.value == v",
                                   arg=choice)
            _apply(page, "Nothing changed")
            assert _config(server)["samples_format"] == choice
    finally:
        api.post("/options", json={"quicksettings_list": before["quicksettings_list"],
                                   "samples_format": before["samples_format"]})


def test_reload_ui_shows_the_current_settings_and_quick_settings(server, api, tmp_path):
    before = api.get("/options").json()
    changed = 6 if before[SETTING] != 6 else 5
    try:
        with browser_page(server.url) as page:
            _open_settings(page)
            page.wait_for_function(f"document.querySelector('#settings_{SETTING} input[type=number]')?.value "
                                   f"== '{before[SETTING]}'")
            assert page.is_hidden("#setting_CLIP_stop_at_last_layers")
            # another client changes a setting and the quick settings list while this page is open
            assert api.post("/options", json={SETTING: changed, "quicksettings_list": [
                "sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"]}).status_code == 200
            page.evaluate("window.easelBeforeReload = true")
            page.click("#settings_restart_gradio")
            page.wait_for_function("window.easelBeforeReload === undefined")  # a new page
            page.wait_for_selector("#setting_CLIP_stop_at_last_layers", state="visible")
            _open_settings(page)
            page.wait_for_function(f"document.querySelector('#settings_{SETTING} input[type=number]')?.value "
                                   f"== '{changed}'")
            _shot(page, tmp_path, "settings_after_reload")
    finally:
        api.post("/options", json={SETTING: before[SETTING], "quicksettings_list": before["quicksettings_list"]})


def test_defaults_section_saves_the_pages_values_into_ui_config(server, tmp_path):
    path = server.data_dir / "ui-config.json"
    before = path.read_text()
    assert json.loads(before)["txt2img/Sampling steps/value"] == 20  # written at start with the built-in defaults
    try:
        with browser_page(server.url) as page:
            box = page.locator("#txt2img_steps input[type=number]")
            box.fill("33")
            box.press("Enter")
            _open_settings(page)
            page.locator("#settings_sections label", has_text="Defaults").click()
            page.click("#settings_defaults_view")
            page.wait_for_function("document.querySelector('#settings_defaults_result').innerText"
                                   ".includes('txt2img/Sampling steps/value')")
            assert "33" in page.inner_text("#settings_defaults_result")
            assert "txt2img/Prompt/value" not in page.inner_text("#settings_defaults_result")  # empty stays empty
            assert json.loads(path.read_text())["txt2img/Sampling steps/value"] == 20  # viewing writes nothing
            _shot(page, tmp_path, "settings_defaults")
            page.click("#settings_defaults_apply")
            page.wait_for_function("document.querySelector('#settings_defaults_result').innerText.includes('Wrote')")
            stored = json.loads(path.read_text())
            assert stored["txt2img/Sampling steps/value"] == 33
            assert stored["txt2img/Width/maximum"] == 2048  # the rest is kept
    finally:
        path.write_text(before)


def test_upscaler_for_img2img_is_chosen_from_the_upscalers(server, api, tmp_path):
    """The Upscaling section offers upscaler_for_img2img as a list of /sdapi/v1/upscalers; Apply stores the pick."""
    names = [u["name"] for u in api.get("/upscalers").json()]
    assert "Nearest" in names
    try:
        with browser_page(server.url) as page:
            _open_settings(page)
            page.locator("#settings_sections label", has_text="Upscaling").click()
            page.wait_for_selector("#settings_upscaler_for_img2img", state="visible")
            assert page.input_value("#settings_upscaler_for_img2img input") == "None"
            pick_dropdown(page, "#settings_upscaler_for_img2img", "Nearest")
            _apply(page, "1 setting(s) changed")
            assert _config(server)["upscaler_for_img2img"] == "Nearest"
            assert api.get("/options").json()["upscaler_for_img2img"] == "Nearest"
            _shot(page, tmp_path, "settings-upscaling")
    finally:
        assert api.post("/options", json={"upscaler_for_img2img": "None"}).status_code == 200
