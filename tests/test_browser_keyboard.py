"""Browser: AUTOMATIC1111's keyboard habits (ui/javascript/keyboard.js): Ctrl+Up/Down emphasis, Ctrl+Enter and
Alt+Enter generate, Esc interrupts, and Generate forever from the right-click menu on Generate."""
from __future__ import annotations

import httpx

from browser import browser_page, set_sizes

PROMPT = "#txt2img_prompt textarea"


def put_cursor(page, selector: str, start: int, end: int | None = None) -> None:
    page.focus(selector)
    page.evaluate("([s, a, b]) => document.querySelector(s).setSelectionRange(a, b)",
                  [selector, start, start if end is None else end])


def test_ctrl_up_and_down_change_the_emphasis(server):
    with browser_page(server.url) as page:
        page.wait_for_selector(PROMPT)
        page.wait_for_function("window.easelOpts && window.easelOpts.keyedit_precision_attention === 0.1")
        page.fill(PROMPT, "a red cat")
        put_cursor(page, PROMPT, 3)  # inside "red": the word at the cursor
        page.keyboard.press("Control+ArrowUp")
        assert page.input_value(PROMPT) == "a (red:1.1) cat"
        page.keyboard.press("Control+ArrowUp")
        assert page.input_value(PROMPT) == "a (red:1.2) cat"
        for _ in range(2):
            page.keyboard.press("Control+ArrowDown")
        assert page.input_value(PROMPT) == "a red cat"  # back at 1.0: the brackets go, as in A1111
        put_cursor(page, PROMPT, 0, 5)  # a selection: "a red"
        page.keyboard.press("Control+ArrowDown")
        assert page.input_value(PROMPT) == "(a red:0.9) cat"
        # the cursor inside an existing weighted block and inside an extra network
        page.fill(PROMPT, "(blue sky:1.3), <lora:tiny:0.8>")
        put_cursor(page, PROMPT, 4)
        page.keyboard.press("Control+ArrowUp")
        assert page.input_value(PROMPT) == "(blue sky:1.4), <lora:tiny:0.8>"
        put_cursor(page, PROMPT, 20)
        page.keyboard.press("Control+ArrowUp")
        assert page.input_value(PROMPT) == "(blue sky:1.4), <lora:tiny:0.85>"


def test_ctrl_enter_and_alt_enter_generate_and_esc_interrupts(server):
    with browser_page(server.url) as page:
        page.wait_for_selector(PROMPT)
        set_sizes(page, steps=2, width=64, height=64)
        page.fill(PROMPT, "a keyboard shortcut")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        assert page.input_value(PROMPT) == "a keyboard shortcut"  # no new line typed
        set_sizes(page, steps=3, width=64, height=64)
        page.focus(PROMPT)
        page.keyboard.press("Alt+Enter")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 3')",
                               timeout=180_000)
        # a long job (a batch of 100: it cannot end before the key does), then Esc with the focus outside the prompt:
        # interrupted, the picture as it stood is the answer
        set_sizes(page, steps=150, width=128, height=128, batch_count=100)
        page.click("#txt2img_generate")
        try:
            page.wait_for_function("/Step ([2-9]|[1-9][0-9]+)\\//.test(document.querySelector('#txt2img_progress').innerText)",
                                   timeout=180_000)
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("Escape")
            page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Interrupted')",
                                   timeout=180_000)
            assert "Steps: 150" in page.inner_text("#txt2img_info")
        finally:  # the server goes on to the next test free, whatever happened here
            httpx.post(server.url + "/sdapi/v1/interrupt", timeout=30)

def test_generate_forever_from_the_right_click_menu(server):
    with browser_page(server.url) as page:
        page.wait_for_selector(PROMPT)
        set_sizes(page, steps=2, width=64, height=64)
        page.fill(PROMPT, "again and again")
        page.fill("#txt2img_seed input", "-1")
        page.click("#txt2img_generate", button="right")
        page.get_by_role("menuitem", name="Generate forever", exact=True).click()
        # three different results in a row, each a new job (a new seed each time)
        seeds = set()
        while len(seeds) < 3:
            page.wait_for_function(
                "(known) => { const m = /Seed: (\\d+)/.exec(document.querySelector('#txt2img_info').innerText);"
                " return m && !known.includes(m[1]); }", arg=sorted(seeds), timeout=180_000)
            seeds.add(page.evaluate("/Seed: (\\d+)/.exec(document.querySelector('#txt2img_info').innerText)[1]"))
        page.click("#txt2img_generate", button="right")
        page.get_by_role("menuitem", name="Cancel generate forever", exact=True).click()
        assert page.evaluate("Object.keys(window.easelGenerateForever)") == []
