"""Tiled VAE encode/decode (agrees with the untiled pass, used automatically and by the setting) and A1111's
NaN check with the automatic float32 retry (on a VAE made to produce NaN in half precision)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine import vae_tiling
from backend.checkpoints import ModelFile
from backend.engine.devices import DevicePolicy
from backend.core.errors import UserError
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.core.options import SETTINGS
from backend.engine.pipelines import common
from backend.engine.pipelines.common import JobContext, StepClock, decode_latents, encode_tensor

torch.set_num_threads(1)
CPU = torch.device("cpu")




@pytest.fixture(scope="module")
def loaded(tiny_models):
    m = LoadedModel(load_sd_model(tiny_models["sd1"]))
    DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32).place(m)
    return m


@pytest.fixture(scope="module")
def model(loaded):
    return loaded.model


def context(loaded, tiny_models, policy=None, **opts) -> JobContext:
    options = {s.key: s.default for s in SETTINGS}
    options.update(opts)
    ckpt = tiny_models["sd1"]
    policy = policy or DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32, free_memory=lambda: 1 << 40)
    return JobContext(loaded=loaded, policy=policy,
                      options=options, outputs_root=ckpt.parent, checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64),
                      vae=None, control=StepClock())


def smooth_latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A latent with image-like low-frequency structure (upsampled noise), as decoded latents have."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, i: calls.append(tuple(i[0].shape[-2:])))
    return calls, handle


def test_spans_cover_the_image_with_the_overlap():
    for size, tile, overlap, align in ((300, 128, 32, 1), (64, 64, 8, 1), (520, 256, 64, 8), (1000, 512, 64, 8)):
        spans = vae_tiling.spans(size, tile, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(e - s == min(tile, size) for s, e in spans)
        assert all(s % align == 0 for s, _ in spans)
        assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))  # overlaps are at least `overlap`


def naive_tiled_decode(vae, z, tile, overlap):
    """Independent tiles through the whole VAE, blended the same way (what plain tiling does)."""
    return vae_tiling._blend(lambda y0, y1, x0, x1: vae.decode(z[:, :, y0:y1, x0:x1], return_dict=False)[0],
                             z.shape[-2], z.shape[-1], tile // 8, overlap // 8, 8, 3, z.device)


def test_tiled_decode_agrees_with_the_whole_decode(model):
    """Within 0.08 mean / 1.5 max on [-1, 1] images. The tiny VAE's random weights see much further than a
    trained VAE's, so border effects are larger than with real models; the whole-latent middle block
    (global attention) and the shared GroupNorm statistics cut the error of plain tiling by 3x."""
    z = smooth_latent(40, 48)
    with torch.no_grad():
        whole = model.vae.decode(z, return_dict=False)[0].float()
        calls, handle = count_calls(model.vae.decoder.up_blocks[0])
        tiled = vae_tiling.decode_tiled(model.vae, z, tile=192, overlap=64)
        handle.remove()
        naive = naive_tiled_decode(model.vae, z, 192, 64)
    assert len(calls) == 2 * 6 and tiled.shape == whole.shape == (1, 3, 320, 384)  # 2 x 3 tiles, two passes
    diff = (tiled - whole).abs()
    naive_diff = (naive - whole).abs()
    assert diff.mean() < 0.08 and diff.max() < 1.5, (float(diff.mean()), float(diff.max()))
    assert diff.mean() < 0.4 * naive_diff.mean(), (float(diff.mean()), float(naive_diff.mean()))
    # no seams: the picture changes no faster across the tile joins than anywhere else
    step = (tiled[0, :, :, 1:] - tiled[0, :, :, :-1]).abs().mean(dim=(0, 1))  # per column boundary
    joins = [x0 - 1 for x0, _ in vae_tiling.spans(48, 24, 8)[1:]] + [x1 - 1 for _, x1 in vae_tiling.spans(48, 24, 8)[:-1]]
    for j in joins:
        assert step[j * 8] < 2.0 * step.median(), (j, float(step[j * 8]), float(step.median()))


def test_tiled_encode_agrees_with_the_whole_encode(model):
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 20, 24, generator=g) * 2 - 1, size=(320, 384), mode="bicubic")
    with torch.no_grad():
        whole = model.vae.encode(x, return_dict=False)[0].mean
        calls, handle = count_calls(model.vae.encoder.down_blocks[0])
        tiled = vae_tiling.encode_tiled(model.vae, x, tile=192, overlap=64)
        handle.remove()
    assert len(calls) == 2 * 6 and tiled.shape == whole.shape == (1, 4, 40, 48)
    diff = (tiled - whole).abs()
    scale = whole.abs().mean()
    assert diff.mean() < 0.1 * scale, (float(diff.mean()), float(scale))


def test_the_pipelines_tile_by_setting_and_automatically(loaded, model, tiny_models, monkeypatch):
    latents = smooth_latent(32, 32) * model.vae_scale_factor
    roomy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32, free_memory=lambda: 1 << 40)
    for setting, expect_tiles in (("Never", False), ("Always", True), ("Automatic", False)):
        ctx = context(loaded, tiny_models, policy=roomy, vae_tiling=setting, vae_tile_size=128, vae_tile_overlap=32)
        calls, handle = count_calls(model.vae.decoder.up_blocks[0])
        images = decode_latents(ctx, latents)
        handle.remove()
        assert images[0].size == (256, 256)
        assert (len(calls) > 1) == expect_tiles, setting
    # Automatic tiles when an untiled pass would not fit in half the free memory...
    short = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32, free_memory=lambda: 64 << 20)
    ctx = context(loaded, tiny_models, policy=short, vae_tile_size=128, vae_tile_overlap=32)
    calls, handle = count_calls(model.vae.decoder.up_blocks[0])
    decode_latents(ctx, latents)
    handle.remove()
    assert len(calls) == 2 * 9
    # ...and above 2048x2048 whatever the memory (checked on the decision, not by decoding 4 MP here)
    assert vae_tiling.should_tile("Automatic", 2560, 2048, dtype=torch.float16, free_bytes=1 << 40)
    assert not vae_tiling.should_tile("Automatic", 1024, 1024, dtype=torch.float16, free_bytes=1 << 40)
    # encoding tiles by the same rule
    ctx = context(loaded, tiny_models, vae_tiling="Always", vae_tile_size=128, vae_tile_overlap=32)
    calls, handle = count_calls(model.vae.encoder.down_blocks[0])
    out = encode_tensor(ctx, torch.zeros(1, 3, 256, 192))
    handle.remove()
    assert out.shape == (1, 4, 32, 24) and len(calls) == 2 * 6


@pytest.fixture()
def nan_model(tiny_models):
    """A tiny model whose VAE decoder returns NaN whenever it runs in less than float32 (like fp16 overflow)."""
    m = LoadedModel(load_sd_model(tiny_models["sd1"]))
    policy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.bfloat16)
    policy.place(m)

    def poison(module, inputs, output):
        return output if output.dtype == torch.float32 else output * float("nan")

    m.model.vae.decoder.register_forward_hook(poison)
    return m, policy


def test_nan_in_the_vae_retries_in_float32_and_notes_it(nan_model, tiny_models):
    loaded, policy = nan_model
    model = loaded.model
    ctx = context(loaded, tiny_models, policy=policy)
    latents = smooth_latent(16, 16) * model.vae_scale_factor
    images = decode_latents(ctx, latents)
    arr = np.asarray(images[0])
    assert arr.std() > 1  # a picture, not the black square NaN gives
    assert next(model.vae.parameters()).dtype == torch.float32 and loaded.vae_upcast
    assert ctx.extra_params.get("VAE precision") == "float32 (NaN retry)"
    assert any("NaNs" in w for w in ctx.warnings)
    # the float32 VAE stays for this checkpoint: placing it again keeps it
    policy.place(loaded)
    assert next(model.vae.parameters()).dtype == torch.float32
    again = context(loaded, tiny_models, policy=policy)
    decode_latents(again, latents)
    assert again.extra_params.get("VAE precision") == "float32 (NaN retry)" and not again.warnings


def test_nan_retry_is_written_into_the_infotext(nan_model, tiny_models):
    import io

    from PIL import Image

    from backend.core.infotext import parse_infotext
    from backend.engine.pipelines import txt2img
    from backend.core.sampler_catalog import resolve_sampling
    from backend.core.schemas import Txt2ImgRequest
    loaded, policy = nan_model
    req = Txt2ImgRequest(prompt="x", steps=2, width=64, height=64, seed=1, sampler_name="Euler",
                         do_not_save_samples=True, do_not_save_grid=True)
    ctx = context(loaded, tiny_models, policy=policy)
    ctx.sampling = resolve_sampling(req, ctx.options["default_sampler"])
    result = txt2img.run(req, ctx)
    text = result.images[0].infotext
    assert "VAE precision: float32 (NaN retry)" in text
    assert parse_infotext(text).get("VAE precision") == "float32 (NaN retry)"
    assert np.asarray(Image.open(io.BytesIO(result.images[0].png))).std() > 1


def test_nan_check_off_or_retry_off(nan_model, tiny_models):
    loaded, policy = nan_model
    model = loaded.model
    latents = smooth_latent(16, 16) * model.vae_scale_factor
    with pytest.raises(UserError, match="NaNs was produced in the VAE"):
        decode_latents(context(loaded, tiny_models, policy=policy, auto_vae_precision=False), latents)
    policy.nan_check = False  # --disable-nan-check: the image comes back as it is
    images = decode_latents(context(loaded, tiny_models, policy=policy), latents)
    assert np.asarray(images[0]).max() == 0 and not loaded.vae_upcast


def test_half_vae_decode_stays_in_its_dtype_without_nan(tiny_models):
    loaded = LoadedModel(load_sd_model(tiny_models["sd1"]))
    model = loaded.model
    policy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.bfloat16)
    policy.place(loaded)
    ctx = context(loaded, tiny_models, policy=policy)
    decode_latents(ctx, smooth_latent(16, 16) * model.vae_scale_factor)
    assert next(model.vae.parameters()).dtype == torch.bfloat16 and "VAE precision" not in ctx.extra_params
    assert common.NAN_RETRY_PARAM[0] == "VAE precision"
