"""Browser: open the UI, type a prompt, Generate, see an image; PNG Info fills txt2img."""
from __future__ import annotations

from pathlib import Path

from browser import browser_page, set_sizes


def test_generate_from_the_browser(server, tmp_path):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a lighthouse at dusk")
        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=180_000)
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')", timeout=60_000)
        info = page.inner_text("#txt2img_info")
        assert "a lighthouse at dusk" in info
        assert "Size: 64x64" in info
        page.screenshot(path=str(tmp_path / "txt2img.png"))
    saved = list((server.data_dir / "outputs" / "txt2img-images").rglob("*.png"))
    assert saved, "the UI run saved no image"


def test_png_info_send_to_txt2img(server):
    sample = Path(__file__).resolve().parent / "data" / "a1111" / "automatic1111_cropped.png"
    if not sample.exists():
        import pytest
        pytest.skip("shared samples not present")
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="PNG Info").click()
        page.set_input_files("#pnginfo_image input[type=file]", str(sample))
        page.wait_for_function("document.querySelector('#pnginfo_html').innerText.includes('photo of a duck')")
        page.click("#pnginfo_send_txt2img")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'photo of a duck'")
        assert page.input_value("#txt2img_neg_prompt textarea") == "monochrome"
        assert page.input_value("#txt2img_seed input") == "235284042"
        assert page.input_value("#txt2img_steps input[type=number]") == "15"
        assert page.input_value("#txt2img_width input[type=number]") == "512"
        assert page.input_value("#txt2img_height input[type=number]") == "400"
