"""Browser: the results area shows the result (the live preview in the gallery's place while sampling, pictures
shown whole, Save / Zip into log/images with log.csv), and the busy and error states next to Generate."""
from __future__ import annotations

import csv
import zipfile

import httpx

from browser import browser_page, set_sizes


def visible(page, selector: str) -> bool:
    return page.evaluate("(s) => { const e = document.querySelector(s); return !!e && e.offsetParent !== null; }",
                         selector)


def test_busy_state_live_preview_in_the_gallery_then_the_result(server):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        assert not visible(page, "#txt2img_interrupt") and not visible(page, "#txt2img_skip")
        assert not visible(page, "#txt2img_preview")  # no empty preview box taking room
        page.fill("#txt2img_prompt textarea", "a long walk")
        # a batch of 100: the job cannot end by itself while the test looks at its busy state (it is interrupted)
        set_sizes(page, steps=80, width=128, height=128, batch_count=100)
        page.click("#txt2img_generate")
        try:
            # while it runs: Generate tells the state, Interrupt and Skip are there, the preview replaces the gallery
            page.wait_for_function("/Running|Queued/.test(document.querySelector('#txt2img_generate').innerText)",
                                   timeout=120_000)
            page.wait_for_selector("#txt2img_interrupt", state="visible")
            assert visible(page, "#txt2img_skip")
            page.wait_for_selector("#txt2img_preview img", state="visible", timeout=180_000)
            assert not visible(page, "#txt2img_gallery")
            page.click("#txt2img_interrupt")
            page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Interrupted')",
                                   timeout=180_000)
        finally:  # the server goes on to the next test free, whatever happened here
            httpx.post(server.url + "/sdapi/v1/interrupt", timeout=30)
        page.wait_for_function("document.querySelector('#txt2img_generate').innerText.trim() === 'Generate'")
        page.wait_for_selector("#txt2img_gallery img", state="visible")
        assert not visible(page, "#txt2img_preview") and not visible(page, "#txt2img_interrupt")
        fit = page.evaluate("getComputedStyle(document.querySelector('#txt2img_gallery img')).objectFit")
        assert fit == "contain"


def test_an_error_shows_next_to_generate(server):
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="img2img").first.click()
        page.wait_for_selector("#img2img_generate", state="visible")
        page.click("#img2img_generate")  # no picture uploaded
        page.wait_for_function("document.querySelector('#img2img_status').innerText.includes('Upload an image')",
                               timeout=60_000)
        assert "Upload an image" in page.inner_text("#img2img_info")
        assert page.inner_text("#img2img_generate").strip() == "Generate"


def test_save_and_zip_the_results(server):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a picture to keep")
        set_sizes(page, steps=2, width=64, height=64)
        page.fill("#txt2img_batch_size input[type=number]", "2")
        page.press("#txt2img_batch_size input[type=number]", "Enter")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('a picture to keep')",
                               timeout=180_000)
        page.click("#save_txt2img")
        page.wait_for_function("document.querySelector('#txt2img_status').innerText.includes('Saved')")
        page.wait_for_selector("#download_files_txt2img", state="visible")
        saved_name = page.inner_text("#txt2img_status").split("Saved: ")[1].split(",")[0].strip()
        page.click("#save_zip_txt2img")
        page.wait_for_function("document.querySelector('#txt2img_status').innerText.includes('Zipped')")
        zip_name = page.inner_text("#txt2img_status").split("Zipped: ")[1].strip()
    folder = server.data_dir / "outputs" / "log" / "images"
    assert (folder / saved_name).is_file()
    rows = list(csv.DictReader(open(folder / "log.csv", encoding="utf-8")))
    mine = [row for row in rows if row["filename"] == saved_name]
    assert mine and mine[0]["prompt"] == "a picture to keep" and mine[0]["steps"] == "2"
    with zipfile.ZipFile(folder / zip_name) as z:
        names = z.namelist()
    assert len(names) == 3  # the grid and the two pictures shown
