"""A1111's "VAE type for decode" / "VAE type for encode" (settings `sd_vae_decode_method`, `sd_vae_encode_method`):
the final pictures (and hires. fix's first pass) decoded by TAESD's decoder, img2img's and hires. fix's encodes by
its encoder, from random-weight TAESD files in their published layout (a plain state dict, madebyollin/taesd's key
names) in models/VAE-taesd; without the files and offline, the full VAE with a warning in the job's warnings."""
from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.checkpoints import ModelFile
from backend.core.infotext import parse_infotext
from backend.core.options import SETTINGS
from backend.engine import previews
from backend.engine.devices import DevicePolicy
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.engine.pipelines.common import JobContext, StepClock, decode_latents, encode_images
from backend.engine.previews import PreviewDecoders, taesd_decoder, taesd_encoder

torch.set_num_threads(1)
CPU = torch.device("cpu")


def write_taesd_files(models_dir: Path) -> None:
    """TAESD's decoders and encoders (SD1 and SDXL) with random weights, saved as the published .pth files are."""
    folder = models_dir / "VAE-taesd"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, build in (("taesd_decoder.pth", taesd_decoder), ("taesdxl_decoder.pth", taesd_decoder),
                        ("taesd_encoder.pth", taesd_encoder), ("taesdxl_encoder.pth", taesd_encoder)):
        if not (folder / name).exists():
            torch.save(build().state_dict(), folder / name)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    m = LoadedModel(load_sd_model(tiny_models["sd1"]))
    DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32).place(m)
    return m


def context(loaded, tiny_models, decoders, **opts) -> JobContext:
    options = {s.key: s.default for s in SETTINGS}
    options.update(opts)
    ckpt = tiny_models["sd1"]
    policy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32, free_memory=lambda: 1 << 40)
    return JobContext(loaded=loaded, policy=policy, options=options, outputs_root=ckpt.parent,
                      checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=StepClock(),
                      previews=decoders)


@pytest.fixture()
def offline(monkeypatch):
    import backend.downloads as downloads
    asked = []
    monkeypatch.setattr(downloads, "network_available", lambda url, timeout=3.0: asked.append(url) or False)
    return asked


def test_the_settings_are_a1111s():
    by_key = {s.key: s for s in SETTINGS}
    for key in ("sd_vae_decode_method", "sd_vae_encode_method"):
        assert by_key[key].default == "Full" and tuple(by_key[key].choices) == ("Full", "TAESD")
    assert by_key["sd_vae_decode_method"].label.startswith("VAE type for decode")
    assert by_key["sd_vae_encode_method"].label.startswith("VAE type for encode")


def test_the_encoder_has_the_published_files_key_names():
    sd = taesd_encoder().state_dict()
    # madebyollin/taesd's encoder: conv, block, then three (bias-free stride-2 conv, 3 blocks), a conv to 4 channels
    assert {"0.weight", "0.bias", "1.conv.0.weight", "1.conv.4.bias", "2.weight", "14.weight", "14.bias"} <= set(sd)
    assert "2.bias" not in sd and "6.bias" not in sd and "10.bias" not in sd
    assert sd["0.weight"].shape == (64, 3, 3, 3) and sd["14.weight"].shape == (4, 64, 3, 3)
    out = taesd_encoder()(torch.rand(1, 3, 64, 48))
    assert out.shape == (1, 4, 8, 6)


def test_taesd_decodes_the_final_pictures_at_full_size(loaded, tiny_models, tmp_path, offline):
    write_taesd_files(tmp_path)
    decoders = PreviewDecoders(tmp_path)
    latents = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(1))
    ctx = context(loaded, tiny_models, decoders, sd_vae_decode_method="TAESD")
    images = decode_latents(ctx, latents)
    assert [im.size for im in images] == [(80, 96), (80, 96)]
    assert ctx.warnings == [] and offline == []  # from the files, no download tried
    assert ctx.extra_params["VAE Decoder"] == "TAESD"  # A1111's infotext entry
    # TAESD's decoder on the latents as the UNet sees them (no VAE scale factor), [0, 1] -> 0..255
    with torch.no_grad():
        expected = decoders.network("TAESD", "sd1")(latents[1:2])[0].clamp(0, 1)
    assert np.abs(np.asarray(images[1], dtype=np.int16)
                  - (expected * 255).round().permute(1, 2, 0).numpy().astype(np.int16)).max() <= 1
    full_ctx = context(loaded, tiny_models, decoders)  # the default: "Full"
    full = decode_latents(full_ctx, latents)
    assert [im.size for im in full] == [(80, 96), (80, 96)] and "VAE Decoder" not in full_ctx.extra_params
    assert np.abs(np.asarray(full[0], dtype=np.int16) - np.asarray(images[0], dtype=np.int16)).mean() > 5
    # the live preview's "Full" stays the checkpoint's VAE
    assert np.array_equal(np.asarray(decode_latents(ctx, latents[:1], method="Full")[0]), np.asarray(full[0]))


def test_offline_without_the_file_the_full_vae_decodes_with_a_warning(loaded, tiny_models, tmp_path, offline,
                                                                      caplog):
    decoders = PreviewDecoders(tmp_path)  # downloads allowed, but offline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = context(loaded, tiny_models, decoders, sd_vae_decode_method="TAESD")
    with caplog.at_level(logging.WARNING, logger=previews.__name__):
        images = decode_latents(ctx, latents)
        again = decode_latents(ctx, latents)
    full = decode_latents(context(loaded, tiny_models, decoders), latents)
    assert np.array_equal(np.asarray(images[0]), np.asarray(full[0])) and np.array_equal(np.asarray(again[0]),
                                                                                       np.asarray(full[0]))
    assert len(ctx.warnings) == 1 and "VAE type for decode" in ctx.warnings[0] and "full VAE" in ctx.warnings[0]
    assert "VAE Decoder" not in ctx.extra_params
    assert offline == [previews.TAESD_URL + "taesd_decoder.pth"]  # tried once
    lines = [r.getMessage() for r in caplog.records if r.name == previews.__name__]
    assert len(lines) == 1 and "taesd_decoder.pth" in lines[0] and "the full VAE is used" in lines[0]


def test_without_networks_or_for_a_flow_model_the_full_vae_is_used(loaded, tiny_models):
    ctx = context(loaded, tiny_models, None, sd_vae_decode_method="TAESD")  # a pipeline run directly
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert decode_latents(ctx, latents)[0].size == (64, 64)
    assert len(ctx.warnings) == 1 and "TAESD was not used" in ctx.warnings[0]


@pytest.mark.parametrize("family, stem", [("flux", "taef1"), ("sd3", "taesd3")])
def test_a_flow_model_uses_its_16_channel_taesd(tmp_path, tiny_models, loaded, offline, family, stem):
    from types import SimpleNamespace
    from backend.engine.pipelines.common import taesd_network
    folder = tmp_path / "VAE-taesd"
    folder.mkdir()
    torch.save(taesd_decoder(16).state_dict(), folder / f"{stem}_decoder.pth")
    torch.save(taesd_encoder(16).state_dict(), folder / f"{stem}_encoder.pth")
    ctx = context(loaded, tiny_models, PreviewDecoders(tmp_path))
    ctx.loaded = SimpleNamespace(model=SimpleNamespace(family=family, latent_channels=16))
    decoder, encoder = taesd_network(ctx, "decoder"), taesd_network(ctx, "encoder")
    latents = torch.randn(2, 16, 4, 3)
    with torch.no_grad():
        assert decoder(latents).shape == (2, 3, 32, 24) and encoder(decoder(latents)).shape == (2, 16, 4, 3)
    assert ctx.warnings == [] and offline == []
    # without the files (and offline): the full VAE, with the warning naming why
    bare = context(loaded, tiny_models, PreviewDecoders(tmp_path / "empty"))
    bare.loaded = SimpleNamespace(model=SimpleNamespace(family=family, latent_channels=16))
    assert taesd_network(bare, "decoder") is None
    assert offline == [previews.TAESD_URL + f"{stem}_decoder.pth"]
    assert len(bare.warnings) == 1 and "not in models/VAE-taesd" in bare.warnings[0]


def test_taesd_encodes_for_img2img(loaded, tiny_models, tmp_path, offline):
    write_taesd_files(tmp_path)
    ctx = context(loaded, tiny_models, PreviewDecoders(tmp_path))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    taesd = encode_images(ctx, [picture, picture], "TAESD")
    full = encode_images(ctx, [picture])
    assert taesd.shape == (2, 4, 8, 6) == (2,) + tuple(full.shape[1:])
    assert ctx.extra_params["VAE Encoder"] == "TAESD" and ctx.warnings == []
    assert not torch.allclose(taesd[:1], full, atol=1e-2)
    offline_ctx = context(loaded, tiny_models, PreviewDecoders(tmp_path / "empty"))
    assert torch.equal(encode_images(offline_ctx, [picture], "TAESD"), full)
    assert "VAE type for encode" in offline_ctx.warnings[0]


def test_the_infotext_entries_paste_back_as_settings():
    from backend.core.infotext import infotext_to_request_fields
    params = parse_infotext("a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, "
                            "VAE Decoder: TAESD, VAE Encoder: TAESD")
    fields = infotext_to_request_fields(params)
    overrides = fields.get("override_settings", {})
    assert overrides.get("sd_vae_decode_method") == "TAESD" and overrides.get("sd_vae_encode_method") == "TAESD"


# -- through the API ------------------------------------------------------------------------------

def test_txt2img_and_hires_fix_decode_with_taesd_through_the_api(api, server):
    write_taesd_files(server.data_dir / "models")
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}

    def run(**settings):
        r = api.post("/txt2img", json={**body, "override_settings": {**body["override_settings"], **settings}})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), info

    full, full_info = run()
    fast, info = run(sd_vae_decode_method="TAESD")
    assert fast.size == full.size == (64, 64)
    assert np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(full, dtype=np.int16)).mean() > 5
    assert parse_infotext(info["infotexts"][0]).get("VAE Decoder") == "TAESD"
    assert "VAE Decoder" not in full_info["infotexts"][0]  # A1111 writes it when not "Full" (reading fills "Full")
    assert not any("TAESD" in w for w in info.get("warnings", []) or [])
    r = api.post("/txt2img", json={**body, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
                                   "denoising_strength": 0.5, "hr_second_pass_steps": 1,
                                   "override_settings": {**body["override_settings"], "sd_vae_decode_method": "TAESD",
                                                         "sd_vae_encode_method": "TAESD"}})
    assert r.status_code == 200, r.text
    hires = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    params = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert hires.size == (96, 96) and params.get("VAE Decoder") == "TAESD" and params.get("VAE Encoder") == "TAESD"


def test_img2img_encodes_and_decodes_with_taesd_through_the_api(api, server):
    write_taesd_files(server.data_dir / "models")
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "LCM",
            "cfg_scale": 1, "denoising_strength": 0.5, "init_images": [base64.b64encode(buf.getvalue()).decode()],
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors", "sd_vae_encode_method": "TAESD",
                                  "sd_vae_decode_method": "TAESD"}}
    r = api.post("/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    params = parse_infotext(info["infotexts"][0])
    assert params.get("VAE Decoder") == "TAESD" and params.get("VAE Encoder") == "TAESD"
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)
