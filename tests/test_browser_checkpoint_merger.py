"""Browser: the Checkpoint Merger tab merges two checkpoints, shows where it saved the result, and the new model is
offered by the checkpoint lists (the one at the top too); a family mix is refused with a message under Merge."""
from __future__ import annotations

from browser import browser_page, pick_dropdown
from model_factory import write_tiny_checkpoint


def test_checkpoint_merger_tab(server, api, tmp_path):
    ckpt_dir = server.data_dir / "models" / "Stable-diffusion"
    sources = [ckpt_dir / "ui-merge-a.safetensors", ckpt_dir / "ui-merge-b.safetensors"]
    result = ckpt_dir / "ui-merged.safetensors"
    try:
        for seed, path in zip((31, 32), sources):
            write_tiny_checkpoint(path, "sd1", seed=seed)
        api.post("/refresh-checkpoints")
        with browser_page(server.url) as page:
            page.set_viewport_size({"width": 1440, "height": 900})
            # the page has loaded its state (the checkpoint at the top) before the tab is used
            page.wait_for_function("!!document.querySelector('#setting_sd_model_checkpoint input')?.value")
            for _attempt in range(5):  # a click before the page's scripts are ready is lost: until the tab shows
                page.get_by_role("tab", name="Checkpoint Merger").click()
                try:
                    page.wait_for_selector("#modelmerger_merge", state="visible", timeout=5000)
                    break
                except Exception:  # noqa: BLE001  playwright's TimeoutError
                    continue
            page.click("#refresh_checkpoint_A")
            page.wait_for_timeout(500)
            pick_dropdown(page, "#modelmerger_primary_model_name", "ui-merge-a")
            pick_dropdown(page, "#modelmerger_secondary_model_name", "tiny-sdxl")
            page.click("#modelmerger_merge")
            page.wait_for_function("document.querySelector('#modelmerger_result').innerText.includes('different families')",
                                   timeout=60_000)
            assert "SDXL" in page.inner_text("#modelmerger_result")
            assert not result.exists()

            pick_dropdown(page, "#modelmerger_secondary_model_name", "ui-merge-b")
            page.fill("#modelmerger_custom_name textarea, #modelmerger_custom_name input", "ui-merged")
            page.get_by_label("Save as float16").check()
            page.click("#modelmerger_merge")
            page.wait_for_function("document.querySelector('#modelmerger_result').innerText.includes('Checkpoint saved to')",
                                   timeout=180_000)
            assert str(result) in page.inner_text("#modelmerger_result")
            assert result.exists()
            page.locator("#modelmerger_result").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "checkpoint_merger.png"))
            # the new model is offered at the top at once
            box = page.locator("#setting_sd_model_checkpoint input").first
            box.click()
            page.wait_for_function("Array.from(document.querySelectorAll('li[role=option]'))"
                                   ".some(o => o.textContent.includes('ui-merged.safetensors'))", timeout=30_000)
            page.keyboard.press("Escape")
        from safetensors import safe_open
        with safe_open(str(result), "pt") as f:
            assert f.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "F16"
    finally:
        for path in sources + [result]:
            path.unlink(missing_ok=True)
        api.post("/refresh-checkpoints")
