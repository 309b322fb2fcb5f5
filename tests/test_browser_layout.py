"""Browser: the layout fixes of issue 13 (hires. fix rows, ControlNet Control Type and titles, Inpaint options,
the translucent inpaint brush, the webcam source), with screenshots at 1440x900 kept in the test's tmp dir."""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from browser import browser_page, inpaint_canvas_with
from controlnet_factory import write_tiny_controlnet
from test_api_img2img import picture

SIZE = {"width": 1440, "height": 900}

# The label of a component laid out on one line: its text box is not taller than 1.5 of its line height.
ONE_LINE_JS = """([elem, text]) => {
    const root = document.querySelector(elem);
    if (!root) return null;
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const node = walker.currentNode;
        if (node.textContent.trim() !== text) continue;
        const el = node.parentElement;
        const range = document.createRange();
        range.selectNodeContents(node);
        const lineHeight = parseFloat(getComputedStyle(el).lineHeight) || parseFloat(getComputedStyle(el).fontSize) * 1.5;
        return {height: range.getBoundingClientRect().height, line: lineHeight,
                top: root.getBoundingClientRect().top};
    }
    return null;
}"""


def _options(page, elem: str) -> list[str]:
    """The choices of a Gradio dropdown, read by opening its list as a person does."""
    page.locator(f"{elem} input").first.click()
    page.wait_for_selector(f"{elem} li[role=option]")
    texts = page.locator(f"{elem} li[role=option]").evaluate_all(
        "options => options.map(o => (o.getAttribute('aria-label') || o.textContent).trim())")
    page.keyboard.press("Escape")
    page.wait_for_selector(f"{elem} li[role=option]", state="detached")
    return texts


def test_hires_fix_rows_keep_labels_on_one_line(server, tmp_path):
    with browser_page(server.url) as page:
        page.set_viewport_size(SIZE)
        page.wait_for_selector("#txt2img_prompt textarea")
        page.get_by_text("Hires. fix", exact=True).first.click()
        page.wait_for_selector("#txt2img_hr_upscaler", state="visible")
        page.locator("#txt2img_hr_upscaler").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "txt2img_hires_1440x900.png"))
        labels = [("#txt2img_hr_upscaler", "Upscaler"), ("#txt2img_hires_steps", "Hires steps"),
                  ("#txt2img_denoising_strength", "Denoising strength"), ("#txt2img_hr_scale", "Upscale by"),
                  ("#txt2img_hr_resize_x", "Resize width to"), ("#txt2img_hr_resize_y", "Resize height to")]
        found = {}
        for elem, text in labels:
            box = page.evaluate(ONE_LINE_JS, [elem, text])
            assert box is not None, f"no label {text!r} in {elem}"
            assert box["height"] <= 1.5 * box["line"], f"{text!r} wraps: {box}"
            found[elem] = box
        # A1111's rows: upscaler, steps, denoising side by side; then upscale by and the two resize sliders.
        tops = [found[e]["top"] for e, _ in labels]
        assert abs(tops[0] - tops[1]) < 2 and abs(tops[1] - tops[2]) < 2, tops
        assert abs(tops[3] - tops[4]) < 2 and abs(tops[4] - tops[5]) < 2 and tops[3] > tops[0] + 20, tops
        page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
        page.wait_for_selector("#txt2img_controlnet_unit0_control_type", state="visible")
        page.screenshot(path=str(tmp_path / "txt2img_hires_controlnet_1440x900.png"))
        page.screenshot(path=str(tmp_path / "txt2img_hires_controlnet_full.png"), full_page=True)


def test_control_type_filters_preprocessors_and_models(server, tmp_path):
    folder = server.data_dir / "models" / "ControlNet"
    for name, seed in (("control_v11p_sd15_canny_layout", 41), ("control_v11f1p_sd15_depth_layout", 42)):
        if not (folder / f"{name}.safetensors").exists():
            write_tiny_controlnet(folder / f"{name}.safetensors", "sd1", seed=seed)
    unit = "#txt2img_controlnet_unit0"
    with browser_page(server.url) as page:
        page.set_viewport_size(SIZE)
        page.wait_for_selector("#txt2img_prompt textarea")
        page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
        page.click(f"{unit}_refresh_models")
        # The refresh rescans the folder: wait until the list holds both new files.
        deadline = time.monotonic() + 60
        while True:
            all_models = _options(page, f"{unit}_model")
            if any("depth_layout" in m for m in all_models) or time.monotonic() > deadline:
                break
        assert any("canny_layout" in m for m in all_models) and any("depth_layout" in m for m in all_models), all_models
        all_modules = _options(page, f"{unit}_module")
        assert "canny" in all_modules and "depth_anything" in all_modules and "openpose" in all_modules

        page.locator(f"{unit}_control_type").get_by_text("Canny", exact=True).click()
        page.wait_for_function("e => document.querySelector(e + ' input').value === 'canny'", arg=f"{unit}_module")
        # the first canny model of the list (the session's server may hold other tests' canny models too)
        page.wait_for_function("e => /^control_v11p_sd15_canny/.test(document.querySelector(e + ' input').value)",
                               arg=f"{unit}_model")
        assert _options(page, f"{unit}_module") == ["none", "invert", "canny"]
        canny_models = _options(page, f"{unit}_model")
        assert canny_models[0] == "None" and any("canny_layout" in m for m in canny_models)
        assert not any("depth" in m for m in canny_models), canny_models
        # The canny preprocessor's sliders came with it.
        page.wait_for_selector(f"{unit}_threshold_a", state="visible")
        page.screenshot(path=str(tmp_path / "controlnet_canny_1440x900.png"))

        page.locator(f"{unit}_control_type").get_by_text("Depth", exact=True).click()
        page.wait_for_function("e => document.querySelector(e + ' input').value === 'depth_anything'",
                               arg=f"{unit}_module")
        page.wait_for_function("e => /^control_v11f1p_sd15_depth/.test(document.querySelector(e + ' input').value)",
                               arg=f"{unit}_model")
        assert _options(page, f"{unit}_module") == ["none", "depth_anything"]

        page.locator(f"{unit}_control_type").get_by_text("All", exact=True).click()
        page.wait_for_function("e => document.querySelector(e + ' input').value === 'none'", arg=f"{unit}_module")
        page.wait_for_function("e => document.querySelector(e + ' input').value === 'None'", arg=f"{unit}_model")
        assert _options(page, f"{unit}_module") == all_modules
        # The model dropdown is wide enough to read a model title in full.
        width = page.locator(f"{unit}_model").bounding_box()["width"]
        assert width >= 400, f"the model dropdown is {width}px wide"


def test_enabled_units_count_in_the_accordion_title(server, tmp_path):
    with browser_page(server.url) as page:
        page.set_viewport_size(SIZE)
        page.wait_for_selector("#txt2img_prompt textarea")
        accordion = page.locator("#txt2img_controlnet")
        accordion.get_by_text("ControlNet", exact=True).first.click()
        page.locator("#txt2img_controlnet_unit0_enable input").check()
        accordion.get_by_text("ControlNet - 1 unit", exact=True).first.wait_for()
        accordion.get_by_role("tab", name="ControlNet Unit 0 [none]").wait_for()
        page.locator("#txt2img_controlnet_unit0_control_type").get_by_text("Canny", exact=True).click()
        accordion.get_by_role("tab", name="ControlNet Unit 0 [Canny]").wait_for()
        accordion.get_by_role("tab", name="ControlNet Unit 1", exact=True).click()
        page.locator("#txt2img_controlnet_unit1_enable input").check()
        accordion.get_by_text("ControlNet - 2 units", exact=True).first.wait_for()
        accordion.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "controlnet_two_units_1440x900.png"))
        page.locator("#txt2img_controlnet_unit1_enable input").uncheck()
        accordion.get_by_text("ControlNet - 1 unit", exact=True).first.wait_for()
        accordion.get_by_role("tab", name="ControlNet Unit 1", exact=True).wait_for()
        accordion.get_by_role("tab", name="ControlNet Unit 0 [Canny]").click()
        page.locator("#txt2img_controlnet_unit0_enable input").uncheck()
        accordion.get_by_text("ControlNet", exact=True).first.wait_for()
        accordion.get_by_role("tab", name="ControlNet Unit 0", exact=True).wait_for()
        assert accordion.get_by_text("ControlNet - 1 unit", exact=True).count() == 0


def test_inpaint_options_only_on_inpaint_sub_tabs(server):
    with browser_page(server.url) as page:
        page.set_viewport_size(SIZE)
        page.get_by_role("tab", name="img2img").first.click()
        options = page.locator("#img2img_inpaint_controls")
        sub_tabs = page.locator("#mode_img2img")
        page.wait_for_selector("#img2img_image", state="visible")
        assert not options.is_visible()
        for name, shown in (("Inpaint", True), ("Sketch", False), ("Inpaint sketch", True), ("Batch", False),
                            ("Inpaint upload", True), ("img2img", False)):
            sub_tabs.get_by_role("tab", name=name, exact=True).click()
            options.wait_for(state="visible" if shown else "hidden")
        # The webcam is one of the pictures' sources, as in A1111 (the source bar's camera button).
        page.locator("#img2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
        page.wait_for_selector("#img2img_controlnet_unit0_image", state="visible")
        for elem in ("#img2img_image", "#img2img_controlnet_unit0_image"):
            assert page.locator(f"{elem} button[aria-label='Capture from camera']").count() == 1, elem


def test_translucent_inpaint_brush(server, tmp_path):
    source = tmp_path / "source.png"
    picture(128, 128).save(source)
    with browser_page(server.url) as page:
        page.set_viewport_size(SIZE)
        canvas, box = inpaint_canvas_with(page, str(source))
        before = Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")
        y = box["y"] + box["height"] * 0.5
        page.mouse.move(box["x"] + box["width"] * 0.3, y)
        page.mouse.down()
        for f in np.linspace(0.3, 0.7, 12):
            page.mouse.move(box["x"] + box["width"] * f, y)
        page.mouse.up()
        page.wait_for_timeout(300)
        after = Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")
        page.screenshot(path=str(tmp_path / "img2img_inpaint_1440x900.png"))
    b = np.asarray(before, dtype=np.int16)
    a = np.asarray(after, dtype=np.int16)
    h, w = a.shape[:2]
    # Where the picture (not the canvas margin) lies under the stroke: the stroke lightens it but the picture
    # still shows through (not plain white), and different pixels of the picture stay different under it.
    row = a[h // 2, int(w * 0.45):int(w * 0.55)]
    under = b[h // 2, int(w * 0.45):int(w * 0.55)]
    assert (row >= under - 2).all() and (row - under).max() > 40, "the brush left no visible stroke"
    assert row.min() < 240, f"the stroke is opaque white: {row.min(0)}"
    assert np.ptp(row[:, 0]) > 10, "the picture does not show through the stroke"
