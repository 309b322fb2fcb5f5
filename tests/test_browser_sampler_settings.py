"""Browser: the sampler noise settings (Settings tab, section "Sampler parameters"): the random number source,
ENSD and the sigma knobs, chosen on the page and stored as /sdapi/v1/options reports them."""
from __future__ import annotations

import os
import shutil

from browser import browser_page, pick_dropdown

KEYS = ("randn_source", "eta_noise_seed_delta", "s_churn")


def test_rng_source_and_ensd_are_set_in_the_settings_tab(server, api, tmp_path):
    before = {k: v for k, v in api.get("/options").json().items() if k in KEYS}
    try:
        with browser_page(server.url) as page:
            page.get_by_role("tab", name="Settings").click()
            page.wait_for_selector("#settings_submit")
            page.locator("#settings_sections label", has_text="Sampler parameters").click()
            page.wait_for_selector("#settings_randn_source", state="visible")
            for key in ("eta_noise_seed_delta", "s_churn", "s_tmin", "s_tmax", "s_noise"):
                page.wait_for_selector(f"#settings_{key}", state="visible")
            pick_dropdown(page, "#settings_randn_source", "NV")
            box = page.locator("#settings_eta_noise_seed_delta input[type=number]")
            box.fill("31337")
            box.press("Enter")
            page.set_viewport_size({"width": 1440, "height": 900})
            shot = tmp_path / "settings_sampler_parameters.png"
            page.screenshot(path=str(shot))
            if os.environ.get("EASEL_SCREENSHOTS"):
                shutil.copy(shot, os.environ["EASEL_SCREENSHOTS"])
            page.click("#settings_submit")
            page.wait_for_function("document.querySelector('#settings_result').innerText.includes('2 setting(s) changed')")
        opts = api.get("/options").json()
        assert opts["randn_source"] == "NV" and opts["eta_noise_seed_delta"] == 31337
    finally:
        api.post("/options", json=before)


def test_pasted_rng_and_ensd_become_override_settings_of_the_tabs_jobs(server, api, tmp_path):
    infotext = ("a pasted fox\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 12, "
                "Size: 64x64, ENSD: 31337, RNG: NV, Version: v1.10.1")
    assert api.get("/options").json()["randn_source"] == "GPU"
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", infotext)
        page.click("#txt2img_paste")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a pasted fox'")
        page.wait_for_selector("#txt2img_override_settings", state="visible")
        shown = page.inner_text("#txt2img_override_settings")
        assert "RNG: NV" in shown and "ENSD: 31337" in shown
        page.set_viewport_size({"width": 1440, "height": 900})
        shot = tmp_path / "txt2img_pasted_overrides.png"
        page.screenshot(path=str(shot))
        if os.environ.get("EASEL_SCREENSHOTS"):
            shutil.copy(shot, os.environ["EASEL_SCREENSHOTS"] + ".paste.png")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Seed: 12')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "ENSD: 31337" in info and "RNG: NV" in info  # the job ran with them
    assert api.get("/options").json()["randn_source"] == "GPU"  # for that job only
