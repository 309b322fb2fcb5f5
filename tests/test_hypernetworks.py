"""A1111 hypernetworks: `<hypernet:name:multiplier>` in a prompt hooks the file's small networks into the UNet's
attention key/value inputs for that job; a later job without the tag gives the checkpoint's own pictures again."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.core.errors import UserError
from backend.engine.networks.activation import parse_hypernetwork_tags
from backend.engine.networks.hypernetworks import HypernetworkMLP, read_hypernetwork
from hypernetwork_factory import hypernetwork_dict, save_hypernetwork
from test_lora_jobs import Backend

torch.set_num_threads(1)
SD1_WIDTHS = [32, 64]  # the tiny SD 1.x UNet: channels 32 and 64, text context 32


@pytest.fixture()
def sd1_backend(tmp_path, tiny_models):
    return Backend(tmp_path, tiny_models["sd1"])


def _by_hand(state: dict, x: torch.Tensor, activation, layer_norm: bool, activate_output: bool) -> torch.Tensor:
    """A1111's HypernetworkModule change, written out: Linear -> activation (not after the last unless
    activate_output) -> LayerNorm, per step."""
    indices = sorted({int(k.split(".")[1]) for k in state})
    y = x
    linears = [i for i in indices if state[f"linear.{i}.weight"].ndim == 2]
    for i in indices:
        w, b = state[f"linear.{i}.weight"], state[f"linear.{i}.bias"]
        if w.ndim == 2:
            y = y @ w.T + b
            if (i != linears[-1] or activate_output) and activation == "relu":
                y = torch.relu(y)
            if (i != linears[-1] or activate_output) and activation == "tanh":
                y = torch.tanh(y)
        else:
            y = torch.nn.functional.layer_norm(y, (w.shape[0],), w, b)
    return y


@pytest.mark.parametrize("activation,layer_norm,activate_output,structure", [
    ("relu", False, False, (1, 2, 1)), ("tanh", True, True, (1, 1.5, 2, 1)), ("linear", False, False, (1, 2, 1))])
def test_each_layer_computes_what_a1111s_module_computes(activation, layer_norm, activate_output, structure):
    saved = hypernetwork_dict([32], seed=3, activation=activation, layer_norm=layer_norm,
                              activate_output=activate_output, layer_structure=structure)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    for state in saved[32]:
        mlp = HypernetworkMLP(state, activation, activate_output)
        expected = _by_hand(state, x, activation, layer_norm, activate_output)
        assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_the_old_two_layer_key_names_load(tmp_path):
    saved = hypernetwork_dict([32], seed=4, activation=None)
    old = {k: ({"linear1.weight": s["linear.0.weight"], "linear1.bias": s["linear.0.bias"],
                "linear2.weight": s["linear.1.weight"], "linear2.bias": s["linear.1.bias"]} for s in v)
           if isinstance(k, int) else v for k, v in saved.items()}
    old[32] = tuple(old[32])
    del old["activation_func"]
    torch.save(old, tmp_path / "old.pt")
    net = read_hypernetwork(tmp_path / "old.pt", "old")
    x = torch.randn(3, 32)
    s = saved[32][0]
    assert torch.allclose(net.layers[32][0](x), (x @ s["linear.0.weight"].T + s["linear.0.bias"]) @ s["linear.1.weight"].T
                          + s["linear.1.bias"], atol=1e-5)


def test_files_that_are_not_hypernetworks_are_refused_clearly(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, tmp_path / "emb.pt")
    with pytest.raises(UserError, match="not a hypernetwork"):
        read_hypernetwork(tmp_path / "emb.pt", "emb")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="junk.pt"):
        read_hypernetwork(tmp_path / "junk.pt", "junk")


def test_tags_are_read_as_a1111_reads_them():
    tags, warnings = parse_hypernetwork_tags(["a <hypernet:anime:0.6> b <hypernet:plain>", "<lora:x:1> <hypernet:bad:w>"])
    assert [(t.name, t.multiplier) for t in tags] == [("anime", 0.6), ("plain", 1.0)]
    assert len(warnings) == 1 and "<hypernet:bad:w>" in warnings[0]


def test_a_hypernetwork_changes_the_picture_and_a_job_without_it_restores_it_bit_for_bit(sd1_backend):
    b = sd1_backend
    save_hypernetwork(b.root / "models" / "hypernetworks" / "styles" / "ink.pt", SD1_WIDTHS, seed=1)
    before, _ = b.run("a red house")
    hooked, result = b.run("a red house <hypernet:ink:1>")
    assert np.abs(hooked - before).mean() > 1.0
    assert result.warnings == []
    assert result.images[0].infotext.startswith("a red house <hypernet:ink:1>")  # the tag stays in the prompt
    weaker, _ = b.run("a red house <hypernet:ink:0.3>")
    assert 0 < np.abs(weaker - before).mean() < np.abs(hooked - before).mean()
    zero, _ = b.run("a red house <hypernet:ink:0>")
    assert np.array_equal(zero, before)  # x + change * 0 is x
    after, _ = b.run("a red house")
    assert np.array_equal(after, before)  # the hooks were removed
    again, _ = b.run("a red house <hypernet:ink:1>")
    assert np.array_equal(again, hooked)  # reproducible


def test_both_attention_kinds_are_hooked_and_several_networks_chain(sd1_backend):
    b = sd1_backend
    folder = b.root / "models" / "hypernetworks"
    save_hypernetwork(folder / "text_only.pt", [32], seed=2)   # text context (32) and the first blocks' channels (32)
    save_hypernetwork(folder / "deep_only.pt", [64], seed=3)   # only the 64-channel blocks' self-attention
    before, _ = b.run("a cat")
    deep, result = b.run("a cat <hypernet:deep_only:1>")
    assert result.warnings == [] and not np.array_equal(deep, before)
    both, _ = b.run("a cat <hypernet:text_only:1> <hypernet:deep_only:1>")
    text, _ = b.run("a cat <hypernet:text_only:1>")
    assert not np.array_equal(both, deep) and not np.array_equal(both, text)


def test_missing_mismatched_and_broken_files_warn_and_the_job_goes_on(sd1_backend):
    b = sd1_backend
    folder = b.root / "models" / "hypernetworks"
    save_hypernetwork(folder / "sdxl_sized.pt", [320, 640, 1280, 2048], seed=4)
    folder.joinpath("broken.pt").write_bytes(b"\x80\x04garbage")
    before, _ = b.run("a dog")
    pixels, result = b.run("a dog <hypernet:nope:1> <hypernet:sdxl_sized:1> <hypernet:broken>")
    assert np.array_equal(pixels, before)
    text = "\n".join(result.warnings)
    assert "Couldn't find hypernetwork with name nope" in text
    assert "sdxl_sized" in text and "not applied" in text
    assert "broken.pt" in text and "without it" in text


def _txt2img_pixels(api, prompt: str):
    import base64
    import io

    from PIL import Image
    r = api.post("/txt2img", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 11,
                                   "sampler_name": "Euler", "do_not_save_samples": True, "do_not_save_grid": True})
    assert r.status_code == 200, r.text
    body = r.json()
    png = base64.b64decode(body["images"][0])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32), body


def test_the_api_lists_hypernetworks_and_a_tag_changes_the_picture(server, api):
    path = save_hypernetwork(server.data_dir / "models" / "hypernetworks" / "api_hn.pt", SD1_WIDTHS, seed=9)
    listed = api.get("/hypernetworks")
    assert listed.status_code == 200
    assert {"name": "api_hn", "path": str(path)} in listed.json()
    plain, _ = _txt2img_pixels(api, "a boat")
    hooked, body = _txt2img_pixels(api, "a boat <hypernet:api_hn:1>")
    assert np.abs(hooked - plain).mean() > 1.0
    assert "<hypernet:api_hn:1>" in body["info"]
    again, _ = _txt2img_pixels(api, "a boat")
    assert np.array_equal(again, plain)
    _, body = _txt2img_pixels(api, "a boat <hypernet:not_there:1>")
    assert "Couldn't find hypernetwork with name not_there" in body["info"]


def test_a_hypernetwork_card_adds_and_removes_its_tag(server, tmp_path):
    from browser import browser_page
    save_hypernetwork(server.data_dir / "models" / "hypernetworks" / "card_hn.pt", SD1_WIDTHS, seed=10)
    with browser_page(server.url) as page:
        page.set_viewport_size({"width": 1440, "height": 900})
        page.fill("#txt2img_prompt textarea", "a castle")
        page.click("#txt2img_extra_networks")
        tabs = page.locator("#txt2img_extra_tabs")
        tabs.wait_for()
        tab_names = tabs.get_by_role("tab").all_inner_texts()
        assert tab_names[:4] == ["Textual Inversion", "Hypernetworks", "Checkpoints", "Lora"]  # A1111's order
        tabs.get_by_role("tab", name="Hypernetworks", exact=True).click()
        page.click("#txt2img_hypernetworks_refresh")
        card = page.locator('#txt2img_hypernetworks_cards .easel-card[data-name="card_hn"]')
        card.wait_for()
        page.screenshot(path=str(tmp_path / "hypernetwork_cards.png"))
        card.click()
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a castle <hypernet:card_hn:1>'")
        card.click()
        page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a castle'")
