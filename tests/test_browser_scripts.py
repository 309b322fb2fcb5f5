"""Browser: the Script dropdown shows the chosen script's controls, and Generate runs the script."""
from __future__ import annotations

from browser import browser_page, pick_dropdown, set_sizes


def test_prompt_matrix_from_the_script_dropdown(server):
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        assert not page.is_visible("#txt2img_script_prompt_matrix_put_at_start")
        page.fill("#txt2img_prompt textarea", "a lighthouse|at dusk")
        set_sizes(page, steps=2, width=64, height=64)
        pick_dropdown(page, "#txt2img_script_list", "Prompt matrix")
        page.wait_for_selector("#txt2img_script_prompt_matrix_put_at_start", state="visible")
        assert not page.is_visible("#txt2img_script_prompts_from_file_or_textbox_prompt_txt")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: 2')",
                               timeout=180_000)
        # the grid, then one picture per combination
        page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length >= 3", timeout=60_000)
        assert page.inner_text("#txt2img_info").startswith("a lighthouse\n")
    grids = list((server.data_dir / "outputs" / "txt2img-grids").rglob("*prompt_matrix*.png"))
    assert grids, "the UI's prompt matrix saved no grid"
