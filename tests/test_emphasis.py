"""The `emphasis` setting (A1111's Emphasis mode): how prompt weights act on the text conditioning, in the engine
and through the API (override_settings, infotext)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

from backend.core.infotext import infotext_to_request_fields, parse_infotext
from backend.core.options import EMPHASIS_MODES
from backend.engine.conditioning import TextConditioner

torch.set_num_threads(1)
CPU = torch.device("cpu")
WEIGHTED = "a (red:1.5) cat, [blue] sky"
PLAIN = "a red cat, blue sky"


def encodings(model, prompt: str) -> dict[str, torch.Tensor]:
    return {mode: TextConditioner(model, CPU, emphasis=mode).encode(prompt).crossattn for mode in EMPHASIS_MODES}


def test_the_modes_give_different_conditioning_for_a_weighted_prompt(sd1):
    z = encodings(sd1, WEIGHTED)
    for a in EMPHASIS_MODES:
        for b in EMPHASIS_MODES:
            if a != b:
                assert not torch.allclose(z[a], z[b]), (a, b)
    # Ignore = the same text without weights; No norm = Ignore times the weights; Original = No norm rescaled
    # to Ignore's mean
    ignore, no_norm, original = z["Ignore"], z["No norm"], z["Original"]
    ratio = no_norm / ignore
    weights = ratio[:, 0]
    assert torch.allclose(ratio, weights[:, None].expand_as(ratio), atol=1e-4)  # one weight per token
    assert {round(w, 3) for w in weights.tolist()} == {1.0, 1.5, round(1 / 1.1, 3)}
    assert torch.allclose(original * (no_norm.mean() / original.mean()), no_norm, atol=1e-5)
    assert torch.allclose(original.mean(), ignore.mean(), atol=1e-5)


def test_the_modes_agree_for_an_unweighted_prompt(sd1, sdxl):
    for model in (sd1, sdxl):
        z = encodings(model, PLAIN)
        for mode in EMPHASIS_MODES:
            assert torch.equal(z[mode], z["Original"]), mode


def test_none_reads_the_brackets_as_text(sd1):
    none = TextConditioner(sd1, CPU, emphasis="None")
    ignore = TextConditioner(sd1, CPU, emphasis="Ignore")
    # "Ignore" drops the brackets from the text ("(red:1.5)" -> "red"); "None" keeps them as characters
    assert torch.equal(ignore.encode("a (red:1.5) cat").crossattn, ignore.encode("a red cat").crossattn)
    assert not torch.equal(none.encode("a (red:1.5) cat").crossattn, none.encode("a red cat").crossattn)


def small(**kw) -> dict:
    return {"prompt": WEIGHTED, "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            **kw}


def image_and_info(resp) -> tuple[np.ndarray, dict]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    return np.asarray(img.convert("RGB"), dtype=np.int16), json.loads(data["info"])


def test_emphasis_through_the_api(api):
    ckpt = {"sd_model_checkpoint": "tiny-sd1.safetensors"}
    original, info = image_and_info(api.post("/txt2img", json=small(override_settings=ckpt)))
    assert "Emphasis" not in info["infotexts"][0]
    no_norm, info = image_and_info(api.post("/txt2img", json=small(override_settings={**ckpt, "emphasis": "No norm"})))
    assert "Emphasis: No norm" in info["infotexts"][0]
    assert np.abs(original - no_norm).max() > 0
    # an unweighted prompt: the same picture in every mode, and no Emphasis in the infotext
    plain, info = image_and_info(api.post("/txt2img", json=small(prompt=PLAIN, override_settings=ckpt)))
    plain_none, info_none = image_and_info(api.post("/txt2img", json=small(
        prompt=PLAIN, override_settings={**ckpt, "emphasis": "None"})))
    assert np.array_equal(plain, plain_none) and "Emphasis" not in info_none["infotexts"][0]
    # the infotext brings the mode back as a setting (A1111's paste)
    fields = infotext_to_request_fields(parse_infotext(WEIGHTED + "\nSteps: 2, Sampler: Euler, Seed: 5, Emphasis: No norm"))
    assert fields["override_settings"]["emphasis"] == "No norm"
    # an infotext with weights and no Emphasis is from before the setting: A1111 reads it as Original
    fields = infotext_to_request_fields(parse_infotext(WEIGHTED + "\nSteps: 2, Sampler: Euler, Seed: 5"))
    assert fields["override_settings"]["emphasis"] == "Original"
    # a mode A1111 does not have is a clear 4xx
    r = api.post("/txt2img", json=small(override_settings={**ckpt, "emphasis": "Loud"}))
    assert 400 <= r.status_code < 500 and "emphasis" in r.text
