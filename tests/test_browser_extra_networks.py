"""Browser: the extra-networks panel below the prompts of img2img (A1111's card panel): a card inserts into
img2img's prompt box that had the focus last (not txt2img's), a second click takes it out, search and sort
order the cards, the card size and LoRA weight settings apply, and a checkpoint card switches the model."""
from __future__ import annotations

import json

from browser import browser_page
from lora_factory import save_lora, simple_lora


def _value(page, elem: str) -> str:
    return page.input_value(f"#{elem} textarea")


def _card_names(page, tab: str, kind: str) -> list[str]:
    return page.eval_on_selector_all(f"#{tab}_{kind}_cards .easel-card", "cards => cards.map(c => c.dataset.name)")


def _open_panel(page, tab: str, sub_tab: str):
    page.click(f"#{tab}_extra_networks")
    tabs = page.locator(f"#{tab}_extra_tabs")
    tabs.wait_for()
    tabs.get_by_role("tab", name=sub_tab, exact=True).click()


def test_img2img_panel_cards_go_into_img2img_negative_prompt(server, api, tmp_path):
    lora_dir = server.data_dir / "models" / "Lora"
    save_lora(lora_dir / "panel_alpha.safetensors", simple_lora("sd1", seed=41), family="sd1")
    save_lora(lora_dir / "panel_beta.safetensors", simple_lora("sd1", seed=42), family="sd1")
    before = api.get("/options").json()
    assert api.post("/options", json={"extra_networks_default_multiplier": 0.7, "extra_networks_card_width": 120,
                                      "extra_networks_card_height": 150}).status_code == 200
    try:
        with browser_page(server.url) as page:
            page.set_viewport_size({"width": 1440, "height": 900})
            page.wait_for_selector("#txt2img_prompt textarea")
            page.fill("#txt2img_prompt textarea", "a txt2img prompt")
            page.get_by_role("tab", name="img2img", exact=True).first.click()
            page.fill("#img2img_prompt textarea", "a lighthouse")
            page.fill("#img2img_neg_prompt textarea", "blurry")  # the last box typed in: img2img's negative prompt
            _open_panel(page, "img2img", "Lora")
            page.click("#img2img_lora_refresh")
            alpha = page.locator('#img2img_lora_cards .easel-card[data-name="panel_alpha"]')
            alpha.wait_for()
            box = alpha.bounding_box()  # the card size settings (120 x 150 px)
            assert abs(box["width"] - 120) <= 2 and abs(box["height"] - 150) <= 2

            # sort: by name, then descending
            names = _card_names(page, "img2img", "lora")
            assert names.index("panel_alpha") < names.index("panel_beta")
            page.click("#img2img_lora_sort_dir")
            page.wait_for_function("() => { const n = Array.from(document.querySelectorAll('#img2img_lora_cards "
                                   ".easel-card'), c => c.dataset.name); return n.indexOf('panel_beta') >= 0 && "
                                   "n.indexOf('panel_beta') < n.indexOf('panel_alpha'); }")
            assert "Descending" in page.inner_text("#img2img_lora_sort_dir")

            # search filters the cards
            page.fill("#img2img_lora_search textarea, #img2img_lora_search input", "panel_al")
            page.wait_for_function("document.querySelectorAll('#img2img_lora_cards .easel-card').length === 1")
            assert _card_names(page, "img2img", "lora") == ["panel_alpha"]
            page.screenshot(path=str(tmp_path / "img2img_extra_networks.png"))

            alpha.click()
            page.wait_for_function("document.querySelector('#img2img_neg_prompt textarea').value.includes('<lora:panel_alpha:0.7>')")
            assert _value(page, "img2img_neg_prompt") == "blurry <lora:panel_alpha:0.7>"
            assert "Added <lora:panel_alpha:0.7> to the img2img negative prompt." in page.inner_text("#img2img_lora_cards")
            assert _value(page, "img2img_prompt") == "a lighthouse"
            assert _value(page, "txt2img_prompt") == "a txt2img prompt"
            assert _value(page, "txt2img_neg_prompt") == ""

            alpha.click()  # clicking again takes it out
            page.wait_for_function("document.querySelector('#img2img_neg_prompt textarea').value === 'blurry'")
            assert _value(page, "img2img_prompt") == "a lighthouse"

            page.click("#img2img_prompt textarea")  # now the positive prompt had the focus last
            alpha.click()
            page.wait_for_function("document.querySelector('#img2img_prompt textarea').value.includes('<lora:panel_alpha')")
            assert _value(page, "img2img_prompt") == "a lighthouse <lora:panel_alpha:0.7>"
            assert _value(page, "img2img_neg_prompt") == "blurry"

            page.click("#img2img_extra_networks")  # the toggle closes the panel
            page.wait_for_selector("#img2img_extra_tabs", state="hidden")
    finally:
        api.post("/options", json={k: before[k] for k in ("extra_networks_default_multiplier", "extra_networks_card_width",
                                                          "extra_networks_card_height")})


def test_the_checkpoints_refresh_also_refreshes_the_checkpoint_dropdown(server, api, tmp_path):
    import shutil
    source = server.data_dir / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
    added = source.with_name("zz-cards-refresh.safetensors")
    try:
        with browser_page(server.url) as page:
            page.set_viewport_size({"width": 1440, "height": 900})
            page.wait_for_selector("#txt2img_prompt textarea")
            _open_panel(page, "txt2img", "Checkpoints")
            page.locator("#txt2img_checkpoints_cards .easel-card").first.wait_for()
            shutil.copyfile(source, added)  # a checkpoint copied in while the page is open
            page.click("#txt2img_checkpoints_refresh")
            page.locator('#txt2img_checkpoints_cards .easel-card[data-name="zz-cards-refresh"]').wait_for()
            page.click("#setting_sd_model_checkpoint input")  # the dropdown at the top offers it without its own refresh
            page.get_by_role("option", name="zz-cards-refresh", exact=False).first.wait_for()
    finally:
        added.unlink(missing_ok=True)
        api.post("/refresh-checkpoints")


def test_checkpoint_card_switches_the_model(server, api, tmp_path):
    name = "tiny-sd1_ckpt.ckpt"
    before = api.get("/options").json()["sd_model_checkpoint"]
    try:
        with browser_page(server.url) as page:
            page.set_viewport_size({"width": 1440, "height": 900})
            page.wait_for_selector("#txt2img_prompt textarea")
            assert not page.input_value("#setting_sd_model_checkpoint input").startswith(name)
            _open_panel(page, "txt2img", "Checkpoints")
            card = page.locator('#txt2img_checkpoints_cards .easel-card[data-name="tiny-sd1_ckpt"]')
            card.wait_for()
            page.fill("#txt2img_checkpoints_search textarea, #txt2img_checkpoints_search input", "sdxl")
            page.wait_for_function("() => { const c = document.querySelectorAll('#txt2img_checkpoints_cards .easel-card'); "
                                   "return c.length === 1 && c[0].dataset.name === 'tiny-sdxl'; }")
            page.fill("#txt2img_checkpoints_search textarea, #txt2img_checkpoints_search input", "")
            card.wait_for()
            page.screenshot(path=str(tmp_path / "txt2img_checkpoint_cards.png"))
            card.click()
            page.wait_for_function("(n) => document.querySelector('#setting_sd_model_checkpoint input').value.startsWith(n)",
                                   arg=name, timeout=180_000)
            assert api.get("/options").json()["sd_model_checkpoint"].startswith(name)  # saved, as the dropdown does
            config = json.loads((server.data_dir / "config.json").read_text())
            assert config["sd_model_checkpoint"].startswith(name)
    finally:
        api.post("/options", json={"sd_model_checkpoint": before or "tiny-sd1.safetensors"})
