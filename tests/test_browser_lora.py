"""Browser: txt2img's extra-networks panel (below the prompts) shows a card per LoRA file (with its preview),
search filters them, a click puts `<lora:name:1>` into the txt2img prompt (the negative prompt when that had
the focus), a second click takes it out, the "i" button shows the file's metadata, and the Textual Inversion
sub-tab lists embeddings. (img2img's panel, sorting and checkpoint cards: test_browser_extra_networks.py.)"""
from __future__ import annotations

import json

import torch
from PIL import Image

from browser import browser_page
from lora_factory import save_embedding, save_lora, simple_lora


def _prompt(page, elem: str) -> str:
    return page.input_value(f"#{elem} textarea")


def test_lora_cards_from_the_browser(server, tmp_path):
    lora_dir = server.data_dir / "models" / "Lora"
    path = save_lora(lora_dir / "browser" / "browser_card.safetensors", simple_lora("sd1", seed=31), family="sd1",
                     metadata={"ss_resolution": "(768, 768)", "ss_sd_model_name": "v1-5-pruned.safetensors",
                               "ss_tag_frequency": json.dumps({"10_img": {"watercolor": 12, "house": 3}})})
    Image.new("RGB", (64, 64), (200, 40, 40)).save(path.with_suffix(".preview.png"))
    save_lora(lora_dir / "browser_other.safetensors", simple_lora("sd1", seed=32), family="sd1")
    save_embedding(server.data_dir / "embeddings" / "browser_emb.pt", torch.randn(1, 32))

    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        page.fill("#txt2img_prompt textarea", "a castle")
        page.click("#txt2img_extra_networks")  # the toggle beside the prompts opens the panel
        page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Lora", exact=True).click()
        page.click("#txt2img_lora_refresh")
        card = page.locator('#txt2img_lora_cards .easel-card[data-name="browser_card"]')
        card.wait_for()
        assert card.locator("img").count() == 1  # the preview beside the file
        assert "browser" in card.inner_text()  # its subfolder
        page.fill("#txt2img_lora_search input, #txt2img_lora_search textarea", "browser_ca")
        page.wait_for_function("document.querySelectorAll('#txt2img_lora_cards .easel-card').length === 1")
        page.screenshot(path=str(tmp_path / "lora_tab.png"), full_page=True)

        card.click()
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.includes('<lora:browser_card:1>')")
        assert _prompt(page, "txt2img_prompt") == "a castle <lora:browser_card:1>"

        page.click("#txt2img_neg_prompt textarea")  # the negative prompt has the focus now
        card.click()
        page.wait_for_function("document.querySelector('#txt2img_neg_prompt textarea').value.includes('<lora:browser_card:1>')")
        assert "<lora:browser_card:1>" in _prompt(page, "txt2img_neg_prompt")
        card.click()  # a second click takes it out again
        page.wait_for_function("!document.querySelector('#txt2img_neg_prompt textarea').value.includes('<lora')")
        assert _prompt(page, "txt2img_prompt") == "a castle <lora:browser_card:1>"

        card.locator(".easel-card-info").click()
        page.wait_for_selector("#txt2img_lora_details .easel-network-details")
        details = page.inner_text("#txt2img_lora_details .easel-network-details")
        assert "(768, 768)" in details and "v1-5-pruned.safetensors" in details and "watercolor (12)" in details
        assert "SD 1.x" in details

        page.locator("#txt2img_extra_tabs").get_by_role("tab", name="Textual Inversion").click()
        page.click("#txt2img_ti_refresh")
        page.locator('#txt2img_ti_cards .easel-card[data-name="browser_emb"]').wait_for()
        page.screenshot(path=str(tmp_path / "ti_tab.png"), full_page=True)
