"""ui/live_page.py: each page is served with the server's settings as they are now, in Gradio's config, and no
page-load event outputs the many settings fields (Gradio's front-end then slows every later click of the page)."""
from __future__ import annotations

import httpx


def _component(config: dict, elem_id: str) -> dict:
    return next(c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_a_page_is_served_with_the_settings_as_they_are_now(server, api):
    before = api.get("/options").json()
    choice = "webp" if before["samples_format"] != "webp" else "jpg"
    try:
        assert api.post("/options", json={"samples_format": choice,
                                           "quicksettings_list": ["sd_model_checkpoint", "samples_format"]}).status_code == 200
        config = httpx.get(server.url + "/config", timeout=60).json()
        assert _component(config, "settings_samples_format")["props"]["value"] == choice
        assert _component(config, "setting_samples_format")["props"]["value"] == choice
        assert _component(config, "settings_loaded")["props"]["value"]["samples_format"] == choice
        page = httpx.get(server.url + "/", timeout=60)
        assert page.status_code == 200 and "settings_samples_format" in page.text
    finally:
        api.post("/options", json={"samples_format": before["samples_format"],
                                   "quicksettings_list": before["quicksettings_list"]})
    config = httpx.get(server.url + "/config", timeout=60).json()
    assert _component(config, "settings_samples_format")["props"]["value"] == before["samples_format"]


def test_no_page_load_event_outputs_the_settings_fields(server):
    config = httpx.get(server.url + "/config", timeout=60).json()
    loads = [d for d in config["dependencies"] if any(t[1] == "load" for t in d["targets"])]
    assert loads and max(len(d["outputs"]) for d in loads) <= 20, [len(d["outputs"]) for d in loads]
