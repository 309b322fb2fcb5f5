"""Browser: img2img's Interrogate DeepBooru button puts the tags of the uploaded picture into the prompt; without a
picture it says so."""
from __future__ import annotations

from browser import browser_page
from test_interrogate import DEFAULT_CAPTION, deepbooru_file, picture, place_deepbooru  # noqa: F401  (fixture)


def test_interrogate_deepbooru_fills_the_prompt(server, deepbooru_file, tmp_path):  # noqa: F811
    place_deepbooru(server, deepbooru_file)
    source = tmp_path / "source.png"
    picture(size=(128, 96)).save(source)
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.get_by_role("tab", name="img2img", exact=True).first.click()
        page.fill("#img2img_prompt textarea", "a prompt to be replaced")
        page.click("#deepbooru")  # no picture yet: an error next to Generate, the prompt kept
        page.wait_for_selector("#img2img_status .easel-error")
        assert "upload a picture" in page.inner_text("#img2img_status")
        assert page.input_value("#img2img_prompt textarea") == "a prompt to be replaced"

        page.set_input_files("#img2img_image input[type=file]", str(source))
        page.wait_for_selector("#img2img_image img")
        page.click("#deepbooru")
        page.wait_for_function(
            "([want]) => document.querySelector('#img2img_prompt textarea').value === want", arg=[DEFAULT_CAPTION],
            timeout=120_000)
        page.wait_for_function("!document.querySelector('#img2img_status .easel-error')")
        page.screenshot(path=str(tmp_path / "img2img_interrogate.png"))
    print("screenshot:", tmp_path / "img2img_interrogate.png")
