"""Browser: draw a mask with the mouse on the Inpaint canvas, generate, and get an inpainted picture."""
from __future__ import annotations

import numpy as np
from PIL import Image

from browser import browser_page, inpaint_canvas_with
from test_api_img2img import picture


def _set_number(page, elem: str, value: str) -> None:
    box = page.locator(f"{elem} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_draw_a_mask_and_inpaint(server, api, tmp_path):
    source = tmp_path / "source.png"
    picture(128, 128).save(source)
    # Keep what the editor sent to the server: the paste-back is checked against it exactly.
    assert api.post("/options", json={"save_init_img": True}).status_code == 200
    with browser_page(server.url) as page:
        canvas, box = inpaint_canvas_with(page, str(source))
        # A horizontal stroke through the middle of the picture, with the (default) brush.
        y = box["y"] + box["height"] * 0.5
        page.mouse.move(box["x"] + box["width"] * 0.3, y)
        page.mouse.down()
        for f in np.linspace(0.3, 0.7, 12):
            page.mouse.move(box["x"] + box["width"] * f, y)
        page.mouse.up()
        page.fill("#img2img_prompt textarea", "a boat")
        for elem, value in (("#img2img_steps", "3"), ("#img2img_width", "128"), ("#img2img_height", "128"),
                            ("#img2img_mask_blur", "0")):
            _set_number(page, elem, value)
        page.click("#img2img_generate")
        page.wait_for_selector("#img2img_info .easel-infotext, #img2img_info .easel-error", timeout=300_000)
        info = page.inner_text("#img2img_info")
        assert "Mask blur: 0" in info, info
        page.screenshot(path=str(tmp_path / "inpaint.png"))
    assert "Denoising strength: 0.75" in info and "a boat" in info
    assert api.post("/options", json={"save_init_img": False}).status_code == 200
    saved = sorted((server.data_dir / "outputs" / "img2img-images").rglob("*.png"), key=lambda p: p.stat().st_mtime)
    result_image = Image.open(saved[-1])
    init_hash = result_image.text["parameters"].split("Init image hash: ")[1].split(",")[0].strip()
    received = Image.open(server.data_dir / "outputs" / "init-images" / f"{init_hash}.png").convert("RGB")
    original = np.asarray(picture(128, 128), dtype=np.int16)
    assert received.size == (128, 128), f"the editor sent a {received.size} image for a 128x128 upload"
    received = np.asarray(received, dtype=np.int16)
    # The editor's canvas may round colours a little; the picture itself must arrive.
    assert np.abs(received - original).max() <= 8, f"the editor altered the picture by {np.abs(received - original).max()}"
    result = np.asarray(result_image.convert("RGB"), dtype=np.int16)
    changed = np.abs(result - received).max(-1) > 0
    assert changed[64, 50:78].all(), "the stroke was not inpainted"
    rows = np.nonzero(changed.any(1))[0]
    assert not changed[:40].any() and not changed[-40:].any(), \
        f"pixels far from the stroke changed (rows {rows.min()}..{rows.max()} changed, {changed.mean():.0%} of the picture)"


def test_send_a_txt2img_result_to_inpaint(server):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a small red house")
        for elem, value in (("#txt2img_steps", "2"), ("#txt2img_width", "64"), ("#txt2img_height", "96")):
            _set_number(page, elem, value)
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_gallery img", timeout=180_000)
        page.click("#txt2img_send_to_inpaint")
        page.wait_for_function("(document.querySelector('#img2img_prompt textarea') || {}).value === 'a small red house'")
        assert page.input_value("#img2img_width input[type=number]") == "64"
        assert page.input_value("#img2img_height input[type=number]") == "96"
        assert page.locator("#mode_img2img [role=tab][aria-selected=true]").inner_text().strip() == "Inpaint"
        page.locator("#img2img_inpaint_controls").wait_for(state="visible")  # the inpaint sub-tab's options show
        page.wait_for_function("document.querySelectorAll('#img2maskimg canvas').length > 0")
        # the editor takes the picture's size (its zoom label goes well over 100% for 64x96), not its 800x800 default
        page.wait_for_function("""() => { const m = document.querySelector('#img2maskimg').innerText.match(/(\\d+)%/);
                                          return m !== null && Number(m[1]) > 100; }""", timeout=30_000)
