"""Browser: a prompt with unbalanced brackets (a chat bot's "smiling :)", an unclosed "(") generates, as in
AUTOMATIC1111 (issue 14: the refusal it used to get became acceptance)."""
from __future__ import annotations

import os

from browser import browser_page, set_sizes

PROMPT = "#txt2img_prompt textarea"
TEXT = "smiling girl :) (masterpiece, best quality"


def test_unbalanced_brackets_generate_from_the_browser(server):
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.wait_for_selector(PROMPT)
        set_sizes(page, steps=2, width=64, height=64)
        page.fill(PROMPT, TEXT)
        page.fill("#txt2img_neg_prompt textarea", "blurry)")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert TEXT in info and "Negative prompt: blurry)" in info
        assert "unclosed" not in info.lower() and "error" not in info.lower()
        shot = os.environ.get("EASEL_SCREENSHOT_DIR")
        if shot:
            page.screenshot(path=os.path.join(shot, "unbalanced_prompt.png"))
