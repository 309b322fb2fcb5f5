"""The prompt boxes' token counter (backend.core.token_counter) counts as the conditioning encodes: the same tokens
as the CLIP tokenizer the sampler uses, no tokens for emphasis or LoRA tags, BREAK fills its chunk, the longest
version of a scheduled prompt; and the browser shows it as the user types."""
from __future__ import annotations

import pytest

from backend.core.clip_bpe import clip_bpe
from backend.core.token_counter import counter_text, prompt_tokens


@pytest.mark.parametrize("text", ["a photo of a cat, masterpiece!!", "Ünïcödé café — 日本語 テスト 123",
                                  "don't stop: (x) [y] {z} 1.5e3 @#$% it's  spaced\ttabs"])
def test_the_same_tokens_as_the_samplers_tokenizer(text):
    from backend.engine.tokenizer import clip_tokenizer
    assert clip_bpe().tokens(text) == clip_tokenizer().tokenize(text)


def test_counts_as_a1111():
    assert prompt_tokens("a cat") == (2, 75)
    assert prompt_tokens("(a cat:1.3) <lora:fluffy:0.8>") == (2, 75)  # weights and tags take no tokens
    assert prompt_tokens("a BREAK b") == (76, 150)  # BREAK fills the first chunk
    assert prompt_tokens("word " * 80) == (80, 150)
    assert prompt_tokens("[dog:a very long cat description:5]")[0] == 5  # the longest version
    assert prompt_tokens("") == (0, 75)
    assert counter_text("a (cat") == "2/75"  # still being typed: counted as it stands


def test_the_counter_follows_typing_in_the_browser(server):
    from browser import browser_page

    with browser_page(server.url) as page:
        page.wait_for_selector("#txt2img_prompt textarea")
        assert page.inner_text("#txt2img_token_counter") == "0/75"
        page.locator("#txt2img_prompt textarea").press_sequentially("a red cat")
        page.wait_for_function("document.querySelector('#txt2img_token_counter').innerText === '3/75'")
        page.fill("#txt2img_neg_prompt textarea", "blurry " * 76)
        page.wait_for_function("document.querySelector('#txt2img_negative_token_counter').innerText === '76/150'")
