"""Browser: the tool buttons show an icon that needs no emoji font, and every tool button has a tooltip
(ui/icons.py, ui/javascript/hints.js). Also keeps 1440x900 screenshots of the main tabs for a reviewer."""
from __future__ import annotations

from browser import browser_page

ICON_ONLY = ["#refresh_sd_model_checkpoint", "#txt2img_random_seed", "#txt2img_reuse_seed"]
TOOLTIPS = ["txt2img_generate", "txt2img_paste", "txt2img_clear_prompt", "txt2img_style_apply",
            "txt2img_res_switch_btn", "txt2img_extra_networks", "save_txt2img", "refresh_sd_model_checkpoint",
            "txt2img_random_seed", "txt2img_reuse_seed"]


def test_icon_buttons_draw_an_svg_and_have_tooltips(server, tmp_path):
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.wait_for_selector("#txt2img_prompt textarea")
        for selector in ICON_ONLY:
            style = page.evaluate("(s) => { const c = getComputedStyle(document.querySelector(s));"
                                  " return [c.backgroundImage, c.color]; }", selector)
            assert style[0].startswith('url("data:image/svg+xml'), (selector, style)
            assert style[1] in ("rgba(0, 0, 0, 0)", "transparent"), (selector, style)  # the emoji glyph not drawn
        page.wait_for_function("(ids) => ids.every(id => { const e = document.getElementById(id);"
                               " return e && e.title && e.getAttribute('aria-label'); })", arg=TOOLTIPS)
        assert "Ctrl+Enter" in page.get_attribute("#txt2img_generate", "title")
        page.screenshot(path=str(tmp_path / "txt2img.png"))
        for name in ("img2img", "Extras", "PNG Info", "Settings"):
            page.get_by_role("tab", name=name).first.click()
            page.wait_for_timeout(300)  # let the tab paint before the screenshot (a picture only, nothing asserted)
            page.screenshot(path=str(tmp_path / f"{name.replace(' ', '_')}.png"))
