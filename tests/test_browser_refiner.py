"""Browser: the Refiner accordion of txt2img and img2img (A1111 1.6+) and the hires. fix checkpoint dropdown."""
from __future__ import annotations

from browser import browser_page, pick_dropdown, set_sizes

def test_refiner_accordion_generates_with_the_refiner(server, tmp_path):
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a lighthouse at dusk")
        set_sizes(page, steps=4, width=64, height=64)
        # the hires. fix accordion has the checkpoint of its second pass, "Use same checkpoint" by default
        page.get_by_text("Hires. fix", exact=True).first.click()
        page.wait_for_selector("#txt2img_hr_checkpoint", state="visible")
        assert page.input_value("#txt2img_hr_checkpoint input") == "Use same checkpoint"

        page.locator("#script_txt2img_refiner").get_by_text("Refiner", exact=True).first.click()
        page.wait_for_selector("#script_txt2img_refiner_enable", state="visible")
        page.check("#script_txt2img_refiner_enable input[type=checkbox]")
        pick_dropdown(page, "#script_txt2img_refiner_checkpoint", "tiny-sd1_ckpt")
        switch = page.locator("#script_txt2img_refiner_switch_at input[type=number]")
        assert switch.input_value() == "0.8"  # A1111's default
        switch.fill("0.5")
        switch.press("Enter")
        page.locator("#script_txt2img_refiner").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "refiner.png"))
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Refiner switch at')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "Refiner: tiny-sd1_ckpt [" in info, info
        assert "Refiner switch at: 0.5" in info, info
        page.screenshot(path=str(tmp_path / "refiner-done.png"))

        # img2img has the accordion too
        page.get_by_role("tab", name="img2img").first.click()
        page.wait_for_selector("#script_img2img_refiner", state="visible")
        page.locator("#script_img2img_refiner").get_by_text("Refiner", exact=True).first.click()
        page.wait_for_selector("#script_img2img_refiner_switch_at", state="visible")
        assert page.input_value("#script_img2img_refiner_switch_at input[type=number]") == "0.8"
        assert not page.is_checked("#script_img2img_refiner_enable input[type=checkbox]")
