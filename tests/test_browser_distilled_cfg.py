"""Browser: the "Distilled CFG Scale" slider (Forge's, FLUX dev's guidance) beside CFG Scale on txt2img and img2img,
filled by a pasted FLUX infotext, and a generation with it goes through."""
from __future__ import annotations

import os
import shutil

from browser import browser_page, set_sizes

FLUX_INFOTEXT = ("a pasted heron\nSteps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 1, "
                 "Distilled CFG Scale: 2.5, Seed: 7, Size: 64x64, Version: f2.0.1v1.10.1-previous-519-g44eb4ea8")


def test_distilled_cfg_scale_slider_is_beside_cfg_scale_and_filled_by_paste(server, tmp_path):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        assert "Distilled CFG Scale" in page.locator("#txt2img_distilled_cfg_scale").inner_text()
        assert page.input_value("#txt2img_distilled_cfg_scale input[type=number]") == "3.5"
        cfg = page.locator("#txt2img_cfg_scale").bounding_box()
        distilled = page.locator("#txt2img_distilled_cfg_scale").bounding_box()
        assert abs(cfg["y"] - distilled["y"]) < 5 and distilled["x"] > cfg["x"]  # one row, beside CFG Scale

        page.fill("#txt2img_prompt textarea", FLUX_INFOTEXT)
        page.click("#txt2img_paste")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a pasted heron'")
        page.wait_for_function(
            "document.querySelector('#txt2img_distilled_cfg_scale input[type=number]').value === '2.5'")
        assert page.input_value("#txt2img_cfg_scale input[type=number]") == "1"
        page.set_viewport_size({"width": 1440, "height": 900})
        page.locator("#txt2img_cfg_scale").scroll_into_view_if_needed()
        shot = tmp_path / "txt2img_distilled_cfg_scale.png"
        page.screenshot(path=str(shot))
        if os.environ.get("EASEL_SCREENSHOTS"):
            shutil.copy(shot, os.environ["EASEL_SCREENSHOTS"])

        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_generate")  # the tiny SD checkpoint ignores the distilled guidance; the job goes through
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Seed: 7')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "a pasted heron" in info and "Distilled CFG Scale" not in info  # Forge writes it for FLUX dev only

        page.get_by_role("tab", name="img2img").first.click()
        page.wait_for_selector("#img2img_distilled_cfg_scale", state="visible")
        assert "Distilled CFG Scale" in page.locator("#img2img_distilled_cfg_scale").inner_text()
        assert page.input_value("#img2img_distilled_cfg_scale input[type=number]") == "3.5"
