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


def test_outpainting_from_the_img2img_script_dropdown(server, tmp_path):
    """Poor man's outpainting moved from its own accordion into the Script dropdown: its controls still act."""
    from test_api_img2img import picture

    source = tmp_path / "source.png"
    picture(64, 64).save(source)
    with browser_page(server.url) as page:
        page.get_by_role("tab", name="img2img").first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(source))
        page.wait_for_selector("#img2img_image img")
        page.fill("#img2img_prompt textarea", "a wide landscape")
        set_sizes(page, steps=2, width=64, height=64, tab="img2img")
        pick_dropdown(page, "#img2img_script_list", "Poor man")  # the helper's JS takes no quote
        pixels = page.locator("#img2img_script_poor_man_s_outpainting_pixels input[type=number]")
        pixels.wait_for(state="visible")
        pixels.fill("16")
        pixels.press("Enter")
        page.click("#img2img_generate")
        page.wait_for_function("document.querySelector('#img2img_info').innerText.includes('Outpainting: 16px')",
                               timeout=180_000)
        assert "Size: 96x96" in page.inner_text("#img2img_info")


def test_prompts_from_a_text_file(server, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text('a red door\n--prompt "a blue door" --steps 1\n')
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        set_sizes(page, steps=2, width=64, height=64)
        pick_dropdown(page, "#txt2img_script_list", "Prompts from file")
        upload = "#txt2img_script_prompts_from_file_or_textbox_prompt_txt_file input[type=file]"
        page.locator(upload).set_input_files(str(lines))
        page.wait_for_function("document.querySelector('#txt2img_script_prompts_from_file_or_textbox_prompt_txt "
                               "textarea').value.includes('a blue door')")
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.startsWith('a red door')",
                               timeout=180_000)
        page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length >= 2", timeout=60_000)


def test_xyz_plot_from_the_script_dropdown(server):
    """X/Y/Z plot chosen in the Script dropdown, X type Steps over "1,2": the gallery shows the grid (with the
    legend band above its cells) and the cells."""
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a small cabin")
        set_sizes(page, steps=3, width=64, height=64)
        assert not page.is_visible("#txt2img_script_x_y_z_plot_x_type")
        pick_dropdown(page, "#txt2img_script_list", "X/Y/Z plot")
        page.wait_for_selector("#txt2img_script_x_y_z_plot_x_type", state="visible")
        pick_dropdown(page, "#txt2img_script_x_y_z_plot_x_type", "Steps")
        page.fill("#txt2img_script_x_y_z_plot_x_values textarea", "1,2")
        page.locator("#txt2img_script_x_y_z_plot_include_lone_images input").check()
        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('Steps: ')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "Steps: 1," in info or "Steps: 2," in info, info  # a cell's steps, not the tab's 3
        assert "X Type: Steps" in info, info  # the grid's infotext, as A1111's info (infotexts[0])
        page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length >= 3", timeout=60_000)
        first = page.locator("#txt2img_gallery img").first
        page.wait_for_function("document.querySelector('#txt2img_gallery img').naturalWidth > 0")
        width, height = first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert width == 2 * 64 and height > 64  # two cells side by side under their "Steps: 1" / "Steps: 2" band
    grids = list((server.data_dir / "outputs" / "txt2img-grids").rglob("*xyz_grid*.png"))
    assert grids, "the UI's X/Y/Z plot saved no grid"


XYZ = "#txt2img_script_x_y_z_plot"


def _tokens(page, elem: str) -> list[str]:
    return page.eval_on_selector_all(f"{elem} .token span", "spans => spans.map(s => s.textContent.trim())")


def _pick_many(page, elem: str, text: str) -> None:
    """Add the choice `text` to the multiselect dropdown `elem`: typed, the list filtered down to it, Enter."""
    box = page.locator(f"{elem} input").first
    box.click()
    box.press_sequentially(text)
    page.wait_for_function(
        """([elem, text]) => {
            const options = document.querySelectorAll(`${elem} li[role=option]`);
            return options.length > 0 && Array.from(options).every(
                o => (o.getAttribute('aria-label') || o.textContent).toLowerCase().includes(text.toLowerCase()));
        }""", arg=[elem, text])
    box.press("Enter")
    page.wait_for_function(
        """([elem, text]) => Array.from(document.querySelectorAll(`${elem} .token span`))
            .some(s => s.textContent.trim() === text)""", arg=[elem, text])


def test_xyz_values_dropdown_csv_mode_swap_and_the_grids_infotext(server):
    """A1111's X/Y/Z controls: an axis with choices (Sampler) shows a multiselect of them instead of the text box;
    "Use text inputs instead of dropdowns" switches back with the values as text; Swap X/Y moves type and values;
    the picked values make the cells; the info area shows the grid's infotext (infotexts[0], naming the axis)."""
    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a stone bridge")
        set_sizes(page, steps=2, width=64, height=64)
        pick_dropdown(page, "#txt2img_script_list", "X/Y/Z plot")
        page.wait_for_selector(f"{XYZ}_x_type", state="visible")
        assert page.is_visible(f"{XYZ}_x_values textarea") and not page.is_visible(f"{XYZ}_x_values_dropdown")
        pick_dropdown(page, f"{XYZ}_x_type", "Sampler")
        page.wait_for_selector(f"{XYZ}_x_values_dropdown", state="visible")
        page.wait_for_selector(f"{XYZ}_x_values textarea", state="hidden")
        _pick_many(page, f"{XYZ}_x_values_dropdown", "Euler a")
        _pick_many(page, f"{XYZ}_x_values_dropdown", "LMS")
        assert _tokens(page, f"{XYZ}_x_values_dropdown") == ["Euler a", "LMS"]

        # text inputs instead of dropdowns: the chosen values, as text; and back
        page.locator(f"{XYZ}_csv_mode input").check()
        page.wait_for_selector(f"{XYZ}_x_values textarea", state="visible")
        page.wait_for_selector(f"{XYZ}_x_values_dropdown", state="hidden")
        assert page.input_value(f"{XYZ}_x_values textarea").replace(" ", "") == "Eulera,LMS"
        page.locator(f"{XYZ}_csv_mode input").uncheck()
        page.wait_for_selector(f"{XYZ}_x_values_dropdown", state="visible")
        page.wait_for_function(f"document.querySelectorAll('{XYZ}_x_values_dropdown .token').length === 2")

        # Swap X/Y: Y gets Sampler and its values, X gets Nothing; swapped back for the run
        page.click(f"{XYZ}_swap_xy")
        page.wait_for_function(f"document.querySelector('{XYZ}_y_type input').value === 'Sampler'")
        page.wait_for_function(f"document.querySelector('{XYZ}_x_type input').value === 'Nothing'")
        page.wait_for_selector(f"{XYZ}_y_values_dropdown", state="visible")
        page.wait_for_function(f"document.querySelectorAll('{XYZ}_y_values_dropdown .token').length === 2")
        assert _tokens(page, f"{XYZ}_y_values_dropdown") == ["Euler a", "LMS"]
        page.click(f"{XYZ}_swap_xy")
        page.wait_for_function(f"document.querySelector('{XYZ}_x_type input').value === 'Sampler'")
        page.wait_for_function(f"document.querySelectorAll('{XYZ}_x_values_dropdown .token').length === 2")

        # the fill button of an axis with choices picks every choice (Z: Schedule type); Nothing takes them away
        assert not page.is_visible(f"{XYZ}_fill_z")
        pick_dropdown(page, f"{XYZ}_z_type", "Schedule type")
        page.click(f"{XYZ}_fill_z")
        page.wait_for_function(f"document.querySelectorAll('{XYZ}_z_values_dropdown .token').length > 5")
        assert {"Automatic", "Karras"} <= set(_tokens(page, f"{XYZ}_z_values_dropdown"))
        pick_dropdown(page, f"{XYZ}_z_type", "Nothing")
        page.wait_for_selector(f"{XYZ}_z_values_dropdown", state="hidden")
        page.wait_for_selector(f"{XYZ}_fill_z", state="hidden")

        page.click("#txt2img_generate")
        page.wait_for_function("document.querySelector('#txt2img_info').innerText.includes('X Type: Sampler')",
                               timeout=180_000)
        info = page.inner_text("#txt2img_info")
        assert "Script: X/Y/Z plot" in info and "X Values: " in info and "Euler a" in info and "LMS" in info, info
        page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length >= 1", timeout=60_000)
        page.wait_for_function("document.querySelector('#txt2img_gallery img').naturalWidth > 0")
        width = page.locator("#txt2img_gallery img").first.evaluate("img => img.naturalWidth")
        assert width == 2 * 64  # the grid of the two picked samplers
