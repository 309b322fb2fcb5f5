"""Browser: enable a ControlNet unit, upload an image, preview the canny map, generate with it."""
from __future__ import annotations

from PIL import Image, ImageDraw

from browser import browser_page, pick_dropdown, set_sizes
from controlnet_factory import write_tiny_controlnet


def test_controlnet_unit_from_the_browser(server, tmp_path):
    folder = server.data_dir / "models" / "ControlNet"
    model = folder / "control_v11p_sd15_canny_browser.safetensors"
    if not model.exists():
        write_tiny_controlnet(model, "sd1", seed=31)
    write_tiny_controlnet(folder / "diffusers_xl_browser.safetensors", "sdxl", layout="diffusers", seed=32)
    picture = tmp_path / "control.png"
    img = Image.new("RGB", (96, 96), "black")
    ImageDraw.Draw(img).rectangle((20, 30, 75, 70), fill="white")
    img.save(picture)

    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a tower")
        set_sizes(page, steps=2, width=64, height=64)
        page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
        page.locator("#txt2img_controlnet_unit0_enable input").check()
        page.set_input_files("#txt2img_controlnet_unit0_image input[type=file]", str(picture))
        pick_dropdown(page, "#txt2img_controlnet_unit0_module", "canny")
        page.wait_for_selector("#txt2img_controlnet_unit0_threshold_a", state="visible")
        page.click("#txt2img_controlnet_unit0_run_preprocessor")
        page.wait_for_selector("#txt2img_controlnet_unit0_preview img", timeout=120_000)
        page.click("#txt2img_controlnet_unit0_refresh_models")
        page.wait_for_timeout(1000)
        box = page.locator("#txt2img_controlnet_unit0_model input").first
        box.click()
        options = page.locator("ul[role=listbox] li").all_inner_texts()
        assert any("control_v11p_sd15_canny_browser" in o for o in options)
        assert not any("diffusers_xl_browser" in o for o in options)  # only models that fit the SD 1.x checkpoint
        page.keyboard.press("Escape")
        pick_dropdown(page, "#txt2img_controlnet_unit0_model", "control_v11p_sd15_canny_browser")
        page.screenshot(path=str(tmp_path / "controlnet_unit.png"), full_page=True)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('ControlNet 0')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "Module: canny" in info and "control_v11p_sd15_canny_browser" in info
        assert page.locator("#txt2img_gallery img").count() >= 2  # the image and the detected map
        page.screenshot(path=str(tmp_path / "controlnet_result.png"), full_page=True)
