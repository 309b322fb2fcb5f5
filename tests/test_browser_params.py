"""Browser: parameters travel as in AUTOMATIC1111 (ui/paste_params.py): Send to img2img carries every field, the
Read parameters button takes a pasted infotext (or the last generation), PNG Info names the checkpoint and offers it
as an override setting, sends to inpaint and extras; Clear prompts, Swap width and height, Size from image."""
from __future__ import annotations

from browser import browser_page, pick_dropdown, set_sizes

NUMBER = "#{tab}_{name} input[type=number]"


def number(page, tab: str, name: str) -> str:
    return page.input_value(NUMBER.format(tab=tab, name=name))


def test_send_to_img2img_carries_the_parameters(server):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a travelling parameter")
        page.fill("#txt2img_neg_prompt textarea", "blurry")
        set_sizes(page, steps=3, width=64, height=96)
        page.fill("#txt2img_seed input", "4321")
        cfg = page.locator("#txt2img_cfg_scale input[type=number]")
        cfg.fill("4.5")
        cfg.press("Enter")
        pick_dropdown(page, "#txt2img_sampling", "DPM++ 2M")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Seed: 4321')",
                               timeout=180_000)
        page.click("#txt2img_send_to_img2img")
        page.wait_for_function("document.querySelector('#img2img_prompt textarea')?.value === 'a travelling parameter'")
        assert page.input_value("#img2img_neg_prompt textarea") == "blurry"
        assert page.input_value("#img2img_seed input") == "4321"
        assert number(page, "img2img", "steps") == "3"
        assert number(page, "img2img", "cfg_scale") == "4.5"
        assert page.input_value("#img2img_sampling input") == "DPM++ 2M"
        assert (number(page, "img2img", "width"), number(page, "img2img", "height")) == ("64", "96")  # the picture's
        page.wait_for_selector("#img2img_image img")


def test_read_parameters_from_the_prompt_box_with_a_checkpoint_override(server):
    infotext = ("a pasted cat\nNegative prompt: ugly\nSteps: 7, Sampler: Euler, Schedule type: Karras, CFG scale: 4.5, "
                "Seed: 99, Size: 128x192, Model hash: 0123456789, Model: tiny-sd1_ckpt, Clip skip: 2")
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", infotext)
        page.click("#txt2img_paste")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a pasted cat'")
        assert page.input_value("#txt2img_neg_prompt textarea") == "ugly"
        assert number(page, "txt2img", "steps") == "7"
        assert page.input_value("#txt2img_seed input") == "99"
        assert (number(page, "txt2img", "width"), number(page, "txt2img", "height")) == ("128", "192")
        assert page.input_value("#txt2img_scheduler input") == "Karras"
        assert number(page, "txt2img", "clip_skip") == "2"
        # the checkpoint the infotext names, found here, offered as an override setting of the tab's jobs
        page.wait_for_selector("#txt2img_override_settings", state="visible")
        assert "Checkpoint: tiny-sd1_ckpt.ckpt" in page.inner_text("#txt2img_override_settings")
        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        assert "Model: tiny-sd1_ckpt" in page.inner_text("#txt2img_info")
        # an empty prompt box: the last generation's parameters
        page.click("#txt2img_clear_prompt")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === ''")
        assert page.input_value("#txt2img_neg_prompt textarea") == ""
        page.fill("#txt2img_seed input", "-1")
        page.click("#txt2img_paste")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a pasted cat'")
        assert page.input_value("#txt2img_seed input") == "99"
        # swap width and height
        set_sizes(page, steps=2, width=64, height=128)
        page.click("#txt2img_res_switch_btn")
        page.wait_for_function("document.querySelector('#txt2img_width input[type=number]')?.value === '128'")
        assert number(page, "txt2img", "height") == "64"


def test_png_info_names_the_checkpoint_and_sends_to_inpaint_and_extras(server, tmp_path):
    import base64
    import io
    import json

    import httpx
    from PIL import Image

    r = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=600, json={
        "prompt": "a picture with parameters", "steps": 2, "width": 64, "height": 96, "seed": 77,
        "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}})
    assert r.status_code == 200, r.text
    picture = tmp_path / "made.png"
    picture.write_bytes(base64.b64decode(r.json()["images"][0]))
    title = json.loads(r.json()["info"])["sd_model_checkpoint"]
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="PNG Info").click()
        page.set_input_files("#pnginfo_image input[type=file]", str(picture))
        page.wait_for_function("document.querySelector('#pnginfo_html').innerText.includes('Checkpoint: ')")
        assert f"Checkpoint: {title}" in page.inner_text("#pnginfo_html")
        page.click("#pnginfo_send_inpaint")
        page.wait_for_function("document.querySelector('#img2img_prompt textarea')?.value === 'a picture with parameters'")
        assert page.input_value("#img2img_seed input") == "77"
        page.wait_for_selector("#img2maskimg canvas", state="visible")
        # Size from image: the inpaint picture's size
        set_sizes(page, steps=2, width=512, height=512, tab="img2img")
        page.click("#img2img_detect_image_size_btn")
        page.wait_for_function("document.querySelector('#img2img_width input[type=number]')?.value === '64'")
        assert number(page, "img2img", "height") == "96"
        page.get_by_role("tab", name="PNG Info").click()
        page.click("#pnginfo_send_extras")
        page.wait_for_selector("#extras_image img", state="visible")
        assert Image.open(io.BytesIO(picture.read_bytes())).size == (64, 96)
