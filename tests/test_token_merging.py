"""Token merging (A1111's token_merging_ratio, _hr, _img2img): the merging against the `tomesd` package A1111 uses,
the UNet hooks that last one pass, and jobs through the API."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend.engine.token_merging import bipartite_merge, ratio_for_pass, token_merging

torch.set_num_threads(1)


@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.5), (7, 9, 0.3), (16, 12, 0.9), (6, 6, 0.0)])
def test_merge_and_unmerge_match_tomesd(h, w, ratio):
    from tomesd.merge import bipartite_soft_matching_random2d

    torch.manual_seed(h * w)
    x = torch.randn(2, h * w, 16)
    r = int(h * w * ratio)
    merge, unmerge = bipartite_merge(x, h, w, r)
    # A1111 calls tomesd with use_rand=False: the top-left token of each 2x2 cell is the destination
    ref_merge, ref_unmerge = bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    merged = merge(x)
    assert merged.shape == (2, h * w - min(r, h * w - (h // 2) * (w // 2)), 16)
    assert sorted(merged.flatten().tolist()) == pytest.approx(sorted(ref_merge(x).flatten().tolist()), abs=1e-6)

    def attention(t):  # self-attention does not care about the order of its tokens
        return torch.softmax(t @ t.transpose(1, 2) / 4, dim=-1) @ t

    # the whole effect on a self-attention: merge, attend, unmerge
    assert torch.allclose(unmerge(attention(merge(x))), ref_unmerge(attention(ref_merge(x))), atol=1e-5)
    if r:
        assert not torch.allclose(unmerge(attention(merge(x))), attention(x), atol=1e-3)


def test_ratio_choice_follows_a1111():
    opts = {"token_merging_ratio": 0.3, "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.6}
    assert ratio_for_pass(opts) == 0.3
    assert ratio_for_pass(opts, hires=True) == 0.3  # hr 0: the base ratio
    assert ratio_for_pass({**opts, "token_merging_ratio_hr": 0.7}, hires=True) == 0.7
    assert ratio_for_pass(opts, img2img=True) == 0.6
    assert ratio_for_pass(opts, img2img=True, overridden=("token_merging_ratio",)) == 0.3
    assert ratio_for_pass({**opts, "token_merging_ratio_img2img": 0.0}, img2img=True) == 0.3


def hook_counts(unet) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def test_the_hooks_last_the_pass_and_merge_only_the_highest_resolution(sd1):
    unet = sd1.unet
    before = hook_counts(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=context).sample
        seen = []
        attn1 = [m.attn1 for m in unet.modules() if hasattr(m, "attn1")]
        with token_merging(unet, 0.5) as hooked:
            assert hooked == len(attn1) and hook_counts(unet) > before
            handles = [a.register_forward_pre_hook(lambda _m, args, kw: seen.append(
                (args[0] if args else kw["hidden_states"]).shape[1]), with_kwargs=True) for a in attn1]
            merged = unet(sample, t, encoder_hidden_states=context).sample
            for handle in handles:
                handle.remove()
        with pytest.raises(RuntimeError):  # removed also when the pass fails
            with token_merging(unet, 0.5):
                raise RuntimeError("sampler failed")
        assert hook_counts(unet) == before
        again = unet(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(plain, again)
    assert not torch.equal(plain, merged) and torch.allclose(plain, merged, atol=0.5)
    # 256 tokens at the latent's size: 128 merged away; the blocks at half size (64 tokens) untouched
    assert 128 in seen and 64 in seen and 256 not in seen


def small(**kw) -> dict:
    body = {"prompt": "a lighthouse at dusk", "steps": 3, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}
    body.update(kw)
    return body


def image_and_info(resp) -> tuple[np.ndarray, str]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    return np.asarray(img.convert("RGB"), dtype=np.int16), json.loads(data["info"])["infotexts"][0]


def test_token_merging_through_the_api(api):
    ckpt = {"sd_model_checkpoint": "tiny-sd1.safetensors"}
    first, text = image_and_info(api.post("/txt2img", json=small(override_settings=ckpt)))
    assert "Token merging" not in text
    zero, _ = image_and_info(api.post("/txt2img", json=small(override_settings={**ckpt, "token_merging_ratio": 0})))
    assert np.array_equal(first, zero)
    merged, text = image_and_info(api.post("/txt2img", json=small(override_settings={**ckpt, "token_merging_ratio": 0.5})))
    assert "Token merging ratio: 0.5" in text and "Token merging ratio hr" not in text
    diff = np.abs(first - merged)
    assert diff.max() > 0 and diff.mean() < 40  # a little different
    after, _ = image_and_info(api.post("/txt2img", json=small(override_settings=ckpt)))
    assert np.array_equal(first, after)  # the hooks went with the job
    # hires. fix: the hr ratio in its own infotext key
    _, text = image_and_info(api.post("/txt2img", json=small(
        enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
        override_settings={**ckpt, "token_merging_ratio_hr": 0.3})))
    assert "Token merging ratio hr: 0.3" in text and "Token merging ratio: " not in text
    # img2img uses its own ratio
    buf = io.BytesIO()
    Image.fromarray(first.astype(np.uint8)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    _, text = image_and_info(api.post("/img2img", json=small(
        init_images=[init], denoising_strength=0.6, override_settings={**ckpt, "token_merging_ratio_img2img": 0.4})))
    assert "Token merging ratio: 0.4" in text
    r = api.post("/txt2img", json=small(override_settings={**ckpt, "token_merging_ratio": 1.5}))
    assert 400 <= r.status_code < 500 and "token_merging_ratio" in r.text
