"""The API side of flow-model sampling: `distilled_cfg_scale` (Forge's field) accepted and range-checked, the SD3
skip-layer guidance settings listed and settable, on the real server (SD checkpoints ignore both)."""
from __future__ import annotations


def small(**kw) -> dict:
    body = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "cfg_scale": 7, "seed": 1, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    body.update(kw)
    return body


def test_distilled_cfg_scale_is_accepted_and_out_of_range_values_refused(api, server):
    import httpx

    r = api.post("/txt2img", json=small(distilled_cfg_scale=2.0))
    assert r.status_code == 200, r.text
    assert "Distilled CFG Scale" not in r.json()["info"]  # Forge writes it for FLUX dev only
    bad = api.post("/txt2img", json=small(distilled_cfg_scale=-1))
    assert 400 <= bad.status_code < 500
    assert "distilled_cfg_scale must be between 0 and 100" in bad.text
    schema = httpx.get(server.url + "/openapi.json", timeout=60).json()
    props = schema["components"]["schemas"]["StableDiffusionProcessingTxt2Img"]["properties"]
    assert props["distilled_cfg_scale"]["default"] == 3.5


def test_sd3_skip_layer_guidance_settings_are_options(api):
    opts = api.get("/options").json()
    assert (opts["sd3_slg_scale"], opts["sd3_slg_layers"], opts["sd3_slg_start"], opts["sd3_slg_end"]) == \
        (0.0, "7, 8, 9", 0.01, 0.2)
