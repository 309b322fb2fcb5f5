"""Helpers for the browser tests: Debian's Chromium driven by Playwright (no browser download)."""
from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Debian's chromium is not installed")
    return path


@contextmanager
def browser_page(url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            wait_until_built(page)
            yield page
        finally:
            browser.close()


def wait_until_built(page, timeout_ms: int = 240_000) -> None:
    """Until Gradio has built the page (the txt2img prompt, or a login form, is there). On a loaded machine building
    the whole UI takes far longer than one step of a test may wait (measured: 30-45 s with the suite running beside
    it), so the page's first appearance gets its own, longer patience; a page that never builds fails the test's
    next wait, which names what it looked for."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function("() => !!(document.querySelector('#txt2img_prompt textarea')"
                               " || document.querySelector('input[type=password]'))", timeout=timeout_ms)
    except PlaywrightTimeout:
        pass


def pick_dropdown(page, elem: str, text: str) -> None:
    """Type `text` into the Gradio dropdown `elem` (a CSS selector) and pick the choice it leads to."""
    box = page.locator(f"{elem} input").first
    box.click()
    box.fill("")
    box.press_sequentially(text)  # Gradio filters the list on key events (fill() alone leaves it unfiltered)
    # Enter picks the list's active entry: wait until Gradio has filtered the list down to the typed text,
    # or under load Enter lands first and picks whatever was active before (the old value stays selected).
    page.wait_for_function(
        """([elem, text]) => {
            const options = document.querySelectorAll(`${elem} li[role=option]`);
            const want = text.toLowerCase();
            return options.length > 0 && Array.from(options).every(
                o => (o.getAttribute('aria-label') || o.textContent).toLowerCase().includes(want));
        }""",
        arg=[elem, text],
    )
    # The entry named exactly `text` is clicked when there is one: Enter picks Gradio's "active" entry, which under
    # load can still point into the list as it was before the filter (X type "Seed" picked for "Steps").
    exact = page.locator(f"{elem} li[role=option]").filter(has_text=text)
    exact = [o for o in exact.all() if (o.get_attribute("aria-label") or o.inner_text()).strip() == text]
    if exact:
        exact[0].click()
        page.wait_for_function(
            """([elem, text]) => document.querySelector(`${elem} input`).value === text
                && document.querySelectorAll(`${elem} li[role=option]`).length === 0""", arg=[elem, text])
        return
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('{elem} input').value.startsWith('{text}')")


def set_sizes(page, steps: int, width: int, height: int, tab: str = "txt2img", batch_count: int | None = None) -> None:
    """Type the sampling steps, width and height (and the batch count) into a generation tab's number boxes (Enter
    commits each)."""
    boxes = (("steps", steps), ("width", width), ("height", height))
    for name, value in boxes + ((("batch_count", batch_count),) if batch_count is not None else ()):
        box = page.locator(f"#{tab}_{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")


def inpaint_canvas_with(page, picture: str):
    """Open img2img > Inpaint, load `picture` into the editor, pick the brush; -> (canvas locator, its box), the
    canvas scrolled into view first so that the box is where the mouse must draw."""
    page.get_by_role("tab", name="img2img").first.click()
    page.locator("#mode_img2img").get_by_role("tab", name="Inpaint", exact=True).click()
    editor = page.locator("#img2maskimg")
    # Let the editor finish setting up its empty canvas first (as a person would, before choosing a file).
    page.wait_for_function("document.querySelectorAll('#img2maskimg canvas').length > 0")
    page.wait_for_selector("#img2img_inpaint_controls", state="visible")  # the layout settled below the editor
    page.wait_for_timeout(1000)
    editor.locator("input[type=file]").set_input_files(picture)
    # The editor starts with an 800x800 canvas and adopts the picture's size once it has loaded it (its zoom
    # label jumps from ~45% to over 100% for a small picture); strokes drawn before that land on the
    # 800x800 canvas, and the editor then sends an 800x800 image.
    page.wait_for_function("""() => { const m = document.querySelector('#img2maskimg').innerText.match(/(\\d+)%/);
                                      return m !== null && Number(m[1]) > 100; }""", timeout=30_000)
    page.wait_for_timeout(300)
    editor.get_by_role("button", name="Brush").first.click()
    page.wait_for_timeout(300)
    canvas = max(editor.locator("canvas").all(), key=lambda c: (c.bounding_box() or {"width": 0})["width"])
    canvas.scroll_into_view_if_needed()
    return canvas, canvas.bounding_box()
