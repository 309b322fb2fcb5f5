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
            yield page
        finally:
            browser.close()


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
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('{elem} input').value.startsWith('{text}')")


def set_sizes(page, steps: int, width: int, height: int, tab: str = "txt2img") -> None:
    """Type the sampling steps, width and height into a generation tab's number boxes (Enter commits each)."""
    for name, value in (("steps", steps), ("width", width), ("height", height)):
        box = page.locator(f"#{tab}_{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
