"""Browser: a user saves the prompts as a style, picks it in the Styles dropdown beside Generate, generates with it,
applies it into the prompt box, and deletes it (styles.csv in the data folder)."""
from __future__ import annotations

import csv

from browser import browser_page, set_sizes


def styles_in(path) -> dict:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_save_pick_generate_apply_and_delete_a_style(server):
    styles_file = server.data_dir / "styles.csv"
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a lighthouse")
        # the editor: a new name, its prompt typed, saved into styles.csv
        page.click("#txt2img_styles_edit_button")
        name = page.locator("#txt2img_edit_style_name input")
        name.wait_for(state="visible")
        name.fill("Browser oil")
        name.press("Enter")
        page.fill("#txt2img_edit_style_prompt textarea", "oil painting, {prompt}, gold frame")
        page.fill("#txt2img_edit_style_neg_prompt textarea", "blurry")
        page.click("#txt2img_style_save")
        page.wait_for_function("document.querySelector('#txt2img_style_status').innerText.includes('Saved style')")
        assert styles_in(styles_file)["Browser oil"]["prompt"] == "oil painting, {prompt}, gold frame"

        # picked in the Styles dropdown beside Generate: the job's prompts carry it
        box = page.locator("#txt2img_styles input").first
        box.click()
        box.press_sequentially("Browser oil")
        page.wait_for_function("""() => { const o = document.querySelectorAll('#txt2img_styles li[role=option]');
            return o.length === 1 && o[0].getAttribute('aria-label') === 'Browser oil'; }""")
        box.press("Enter")
        page.wait_for_function("document.querySelector('#txt2img_styles').innerText.includes('Browser oil')")
        page.keyboard.press("Escape")
        set_sizes(page, steps=2, width=64, height=64)
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert info.startswith("oil painting, a lighthouse, gold frame\n"), info
        assert "Negative prompt: blurry" in info

        # Apply styles: written into the prompt boxes, the selection emptied
        page.click("#txt2img_style_apply")
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value"
                               " === 'oil painting, a lighthouse, gold frame'")
        assert page.input_value("#txt2img_neg_prompt textarea") == "blurry"
        page.wait_for_function("!document.querySelector('#txt2img_styles').innerText.includes('Browser oil')")

        # Delete: gone from the file
        page.click("#txt2img_style_delete")
        page.wait_for_function("document.querySelector('#txt2img_style_status').innerText.includes('Deleted style')")
        assert "Browser oil" not in styles_in(styles_file)
