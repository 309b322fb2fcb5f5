"""Browser: img2img's Interrogate DeepBooru and Interrogate CLIP buttons put a caption of the uploaded picture into
the prompt; without a picture they say so."""
from __future__ import annotations

from browser import browser_page
from interrogate_factory import CATEGORIES
from test_interrogate import (DEFAULT_CAPTION, clip_models, deepbooru_file, picture,  # noqa: F401  (fixtures)
                              place_clip_models, place_deepbooru)


def test_interrogate_buttons_fill_the_prompt(server, deepbooru_file, clip_models, tmp_path):  # noqa: F811
    place_deepbooru(server, deepbooru_file)
    place_clip_models(server, clip_models)
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

        page.click("#interrogate")  # BLIP's caption, then each category file's best lines
        page.wait_for_function(  # the caption and 3 + 1 + 1 category matches
            "([old]) => { const v = document.querySelector('#img2img_prompt textarea').value;"
            " return v !== old && v.split(', ').length === 6; }", arg=[DEFAULT_CAPTION], timeout=180_000)
        matches = page.input_value("#img2img_prompt textarea").split(", ")[1:]
        assert matches[3] in CATEGORIES["mediums"] and matches[4] in CATEGORIES["movements"]
        page.screenshot(path=str(tmp_path / "img2img_interrogate.png"))
    print("screenshot:", tmp_path / "img2img_interrogate.png")


def test_settings_have_an_interrogate_section_with_the_category_files(server, api, clip_models, tmp_path):  # noqa: F811
    place_clip_models(server, clip_models)
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.get_by_role("tab", name="Settings").click()
        page.locator("#settings_sections label", has_text="Interrogate").click()
        page.wait_for_selector("#settings_section_interrogate", state="visible")
        for key in ("interrogate_deepbooru_score_threshold", "deepbooru_sort_alpha", "interrogate_clip_num_beams",
                    "interrogate_keep_models_in_memory"):
            page.wait_for_selector(f"#settings_{key}", state="visible")
        page.locator("#settings_interrogate_clip_skip_categories input").click()  # the files of models/interrogate
        for name in ("flavors.top3", "mediums", "movements"):
            page.wait_for_selector(f"#settings_interrogate_clip_skip_categories li[role=option] >> text={name}")
        page.screenshot(path=str(tmp_path / "settings_interrogate.png"))
    print("screenshot:", tmp_path / "settings_interrogate.png")
