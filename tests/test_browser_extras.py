"""Browser: the Extras tab upscales an uploaded image with a model upscaler and saves it with its steps."""
from __future__ import annotations

from PIL import Image

from browser import browser_page, pick_dropdown
from postprocess_factory import link_models, write_test_models


def test_extras_upscales_an_uploaded_image(server, tmp_path, tmp_path_factory):
    import skimage.data

    files = write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("compact",))
    link_models(files, server.data_dir / "models")
    picture = tmp_path / "upload.png"
    Image.fromarray(skimage.data.astronaut()).crop((150, 40, 198, 72)).save(picture)
    out_dir = server.data_dir / "outputs" / "extras-images"
    before = set(out_dir.glob("*.png")) if out_dir.exists() else set()

    with browser_page(server.url) as page:
        page.get_by_role("tab", name="Extras").click()
        page.set_input_files("#extras_image input[type=file]", str(picture))
        page.wait_for_selector("#extras_image img")
        box = page.locator("#extras_upscaling_resize input[type=number]")
        box.fill("2")
        box.press("Enter")
        page.click("#extras_refresh_upscalers")
        page.wait_for_timeout(500)
        pick_dropdown(page, "#extras_upscaler_1", "R-ESRGAN General 4xV3")
        page.click("#extras_generate")
        page.wait_for_selector("#extras_gallery img", timeout=180_000)
        page.wait_for_function("document.querySelector('#extras_info').innerText.includes('Postprocess upscaler')",
                               timeout=60_000)
        info = page.inner_text("#extras_info")
        assert "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN General 4xV3" in info
        assert "Saved:" in info
        page.screenshot(path=str(tmp_path / "extras.png"), full_page=True)

    saved = sorted(set(out_dir.glob("*.png")) - before)
    assert len(saved) == 1, "the Extras run saved no image into outputs/extras-images"
    with Image.open(saved[0]) as img:
        assert img.size == (96, 64)
        assert img.info["parameters"] == "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN General 4xV3"
