"""A1111's ways of skipping the negative prompt's UNet pass: `s_min_uncond` (NGMS: below that sigma, on every other
model call, or on all with `s_min_uncond_all`) and `skip_early_cond` (the first fraction of the steps). A skipped
call runs the UNet on the prompt alone (batch 1 instead of 2) and uses its prediction as CFG 1 does."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from backend.core.infotext import infotext_to_request_fields, parse_infotext
from backend.engine.pipelines.common import UncondSkips
from test_lora_jobs import Backend


@pytest.fixture()
def sd1_backend(tmp_path, tiny_models):
    return Backend(tmp_path, tiny_models["sd1"])


@contextlib.contextmanager
def unet_batches():
    """The batch size of every UNet call made inside the block."""
    from diffusers import UNet2DConditionModel
    sizes = []

    def record(module, args, kwargs):
        if isinstance(module, UNet2DConditionModel):
            sample = args[0] if args else kwargs["sample"]
            sizes.append(sample.shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: record(m, a, {}))
    try:
        yield sizes
    finally:
        handle.remove()


def test_the_rule_per_call():
    ngms = UncondSkips(min_sigma=5.0)
    assert [ngms.skip(call, call, 6, 1.0) for call in range(6)] == [False, True] * 3  # every other call
    assert [ngms.skip(call, call, 6, 9.0) for call in range(6)] == [False] * 6  # sigma above the minimum
    assert all(UncondSkips(min_sigma=5.0, all_steps=True).skip(c, c, 6, 1.0) for c in range(6))
    early = UncondSkips(early=0.5)
    assert [early.skip(s, s, 6, 9.0) for s in range(6)] == [True, True, True, True, False, False]  # step/6 <= 0.5
    assert not any(UncondSkips().skip(c, c, 6, 0.1) for c in range(6))  # A1111's defaults skip nothing


def test_a_job_skips_the_negative_pass_where_asked_and_writes_the_infotext(sd1_backend):
    b = sd1_backend
    with unet_batches() as plain_calls:
        plain, _ = b.run("a ship", steps=4)
    assert plain_calls == [2, 2, 2, 2]
    with unet_batches() as calls:
        ngms, result = b.run("a ship", steps=4, s_min_uncond=1000.0)  # every sigma is below it
    assert calls == [2, 1, 2, 1]
    assert not np.array_equal(ngms, plain)
    assert "NGMS: 1000" in result.images[0].infotext
    with unet_batches() as calls:
        _, result = b.run("a ship", steps=4, options={"s_min_uncond": 1000.0, "s_min_uncond_all": True})
    assert calls == [1, 1, 1, 1]  # the setting, when the request gives none
    assert "NGMS all steps: True" in result.images[0].infotext
    with unet_batches() as calls:
        early, result = b.run("a ship", steps=4, options={"skip_early_cond": 0.25})
    assert calls == [1, 1, 2, 2]  # steps 0 and 1 (1/4 <= 0.25)
    assert "Skip Early CFG: 0.25" in result.images[0].infotext
    with unet_batches() as calls:
        cfg1, _ = b.run("a ship", steps=4, cfg_scale=1, options={"s_min_uncond": 1000.0, "s_min_uncond_all": True})
    assert calls == [1, 1, 1, 1]
    all_skipped, _ = b.run("a ship", steps=4, options={"s_min_uncond": 1000.0, "s_min_uncond_all": True})
    assert np.array_equal(all_skipped, cfg1)  # a skipped call is the prompt's prediction alone, as CFG 1


def test_pasting_the_infotext_gives_the_settings_back():
    params = parse_infotext("a ship\nSteps: 4, Sampler: Euler, CFG scale: 6, Seed: 7, Size: 64x64, "
                            "Skip Early CFG: 0.25, NGMS: 2.5, NGMS all steps: True")
    overrides = infotext_to_request_fields(params)["override_settings"]
    assert overrides["s_min_uncond"] == 2.5 and overrides["s_min_uncond_all"] is True
    assert overrides["skip_early_cond"] == 0.25
