"""Browser: reloading the page while a txt2img job runs reattaches to it (progress, then the image and its infotext)."""
from __future__ import annotations

import time

import httpx

from browser import browser_page, set_sizes

SEED = 4242


def test_reload_during_a_job_shows_its_progress_then_its_result(server, tmp_path):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a windmill in the rain")
        set_sizes(page, steps=150, width=256, height=256)
        page.fill("#txt2img_seed input", str(SEED))
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('Step ')", timeout=180_000)
        started = time.monotonic()

        page.reload()
        page.wait_for_selector("#txt2img_prompt textarea")
        # the reloaded page follows the job: its progress bar comes back while the job still runs
        page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('Step ')", timeout=60_000)
        reattached_after = time.monotonic() - started
        assert page.locator("#txt2img_gallery img").count() == 0, "the gallery shows an image before the job ended"

        # and when the job ends, its image and infotext
        page.wait_for_selector("#txt2img_gallery img", timeout=600_000)
        page.wait_for_function(f"document.querySelector('#txt2img_info').innerText.includes('Seed: {SEED}')",
                               timeout=60_000)
        info = page.inner_text("#txt2img_info")
        assert "a windmill in the rain" in info and "Steps: 150" in info and "Size: 256x256" in info
        assert page.inner_text("#txt2img_progress").strip() == ""
        page.screenshot(path=str(tmp_path / "reattached.png"))
        print(f"reattached {reattached_after:.1f} s after the reload began")



def test_generate_after_a_reattach_shows_only_the_new_job(server):
    """A new Generate stops following the reattached job: the old job's result, when it comes after the press,
    never shows (nor replaces the new one's)."""
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "an old job")
        # a batch of 100: the old job cannot end by itself before the new Generate (it is interrupted below)
        set_sizes(page, steps=100, width=256, height=256, batch_count=100)
        page.fill("#txt2img_seed input", "1111")
        page.click("#txt2img_generate")
        try:
            page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('Step ')",
                                   timeout=180_000)
            page.reload()
            page.wait_for_selector("#txt2img_prompt textarea")
            page.wait_for_function("document.querySelector('#txt2img_progress').innerText.includes('Step ')",
                                   timeout=60_000)
            page.fill("#txt2img_prompt textarea", "a new job")
            set_sizes(page, steps=2, width=64, height=64)
            page.fill("#txt2img_seed input", "2222")
            page.click("#txt2img_generate")
            # the new job waits behind the old one: the server has taken the press
            page.wait_for_function("document.querySelector('#txt2img_generate').innerText.includes('Queued')",
                                   timeout=60_000)
            # record every infotext the page shows from now on, then end the old job: its result comes now
            page.evaluate("""() => {
                window.easelInfos = [];
                const info = document.querySelector('#txt2img_info');
                new MutationObserver(() => window.easelInfos.push(info.innerText))
                    .observe(info, {childList: true, subtree: true, characterData: true});
            }""")
            assert httpx.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] > 0
            httpx.post(server.url + "/sdapi/v1/interrupt", timeout=30)
            page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Seed: 2222')",
                                   timeout=600_000)
        finally:  # the server goes on to the next test free, whatever happened here
            httpx.post(server.url + "/sdapi/v1/interrupt", timeout=30)
        shown = page.evaluate("window.easelInfos")
        assert not [text for text in shown if "Seed: 1111" in text], "the reattached job's result was shown too"
