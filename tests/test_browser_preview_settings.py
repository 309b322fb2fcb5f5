"""Browser: the live preview method, the emphasis mode and the token merging ratios in the Settings tab (their
sections, their choices), stored by Apply."""
from __future__ import annotations

import json
import time

from browser import browser_page, pick_dropdown



def _config(server) -> dict:
    path = server.data_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_preview_method_emphasis_and_token_merging_in_the_settings_tab(server, api, tmp_path):
    before = api.get("/options").json()
    assert before["show_progress_type"] == "Approx NN" and before["emphasis"] == "Original"
    assert before["token_merging_ratio"] == 0
    try:
        with browser_page(server.url) as page:
            page.set_viewport_size({"width": 1440, "height": 900})
            page.get_by_role("tab", name="Settings").click()
            page.wait_for_selector("#settings_submit")
            page.wait_for_selector("#settings_emphasis", state="visible")  # Stable Diffusion, the first section
            page.locator("#settings_sections label", has_text="Optimizations").click()
            page.wait_for_selector("#settings_token_merging_ratio", state="visible")
            page.wait_for_selector("#settings_token_merging_ratio_hr", state="visible")
            page.wait_for_selector("#settings_token_merging_ratio_img2img", state="visible")
            page.locator("#settings_sections label", has_text="Live previews").click()
            page.wait_for_selector("#settings_show_progress_type", state="visible")
            pick_dropdown(page, "#settings_show_progress_type", "TAESD")
            page.screenshot(path=str(tmp_path / "settings_live_previews.png"))
            page.click("#settings_submit")
            deadline = time.monotonic() + 60
            while _config(server).get("show_progress_type") != "TAESD":
                assert time.monotonic() < deadline, "Apply did not store the preview method"
                page.wait_for_timeout(200)
        assert api.get("/options").json()["show_progress_type"] == "TAESD"
    finally:
        api.post("/options", json={"show_progress_type": before["show_progress_type"]})
