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
    page.click("#settings_submit")
    page.wait_for_function(f"document.querySelector('#settings_result').innerText.includes({expect!r})")


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
