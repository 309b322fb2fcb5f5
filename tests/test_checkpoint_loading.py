"""Single-file checkpoint loading: detection from shapes, LDM <-> diffusers conversion, safe reading, tokenizer."""
from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from backend.core.errors import UserError  # noqa: E402
from backend.engine.ldm_convert import diffusers_to_ldm, ldm_to_diffusers  # noqa: E402
from backend.engine.model_detection import ModelSpec, detect_checkpoint  # noqa: E402
from backend.engine.model_loader import (apply_vae_state_dict, guess_v_prediction, load_sd_model, load_vae_file,  # noqa: E402
                                  sd_alphas_cumprod)
from backend.core.tensor_headers import read_safetensors_metadata  # noqa: E402
from backend.engine.state_dict_io import read_state_dict  # noqa: E402
from backend.engine.tokenizer import clip_tokenizer  # noqa: E402
from model_factory import tiny_configs, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~100x faster on one thread when the 2 cores are shared (OpenMP barriers spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def written(folder):
    """(path, originals) per variant, written once for the module."""
    made = {}

    def get(name: str, family: str = "sd1", **kwargs):
        if name not in made:
            fmt = kwargs.get("fmt", "safetensors")
            path = folder / f"{name}.{fmt}"
            made[name] = (path, write_tiny_checkpoint(path, family, seed=3, **kwargs))
        return made[name]
    return get


@pytest.fixture(scope="module")
def loaded(written):
    cache = {}

    def get(name: str, family: str = "sd1", **kwargs):
        if name not in cache:
            path, originals = written(name, family, **kwargs)
            cache[name] = (load_sd_model(path), originals)
        return cache[name]
    return get


def _modules(model) -> dict:
    mods = {"unet": model.unet, "vae": model.vae}
    for i, enc in enumerate(model.text_encoders):
        mods["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = enc
    return mods


def _assert_same_weights(model, originals, convert=lambda t: t):
    for part, module in _modules(model).items():
        got = module.state_dict()
        want = originals[part]
        assert set(got) == set(want), f"{part}: key sets differ: {sorted(set(got) ^ set(want))[:5]}"
        for key, value in want.items():
            assert torch.equal(got[key], convert(value)), f"{part}.{key} differs"


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,family,inpaint", [("sd1", "sd1", False), ("sd2", "sd2", False), ("sdxl", "sdxl", False),
                                                 ("sd1-inpaint", "sd1", True)])
def test_round_trip_exact(loaded, name, family, inpaint):
    model, originals = loaded(name, family, inpaint=inpaint)
    assert model.family == family
    assert model.is_inpaint is inpaint
    assert model.unet.config.in_channels == (9 if inpaint else 4)
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if family == "sdxl" else 1)
    _assert_same_weights(model, originals)
    for module in _modules(model).values():
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad and p.device.type == "cpu" for p in module.parameters())
        assert all(b.device.type == "cpu" for b in module.buffers())


@pytest.mark.parametrize("family,inpaint", [("sd1", False), ("sd2", False), ("sdxl", False), ("sd1", True)])
def test_detection_reads_dims(written, family, inpaint):
    path, _ = written(family + ("-inpaint" if inpaint else ""), family, inpaint=inpaint)
    spec = detect_checkpoint(read_state_dict(path))
    expected = tiny_configs(family, inpaint=inpaint)
    assert spec.family == family and spec.is_sdxl == (family == "sdxl") and spec.is_inpaint is inpaint
    assert spec.unet_config == expected["unet"]
    assert spec.vae_config == expected["vae"]
    assert spec.text_encoder_configs == expected["text_encoders"]
    assert spec.text_encoder_classes == expected["classes"]
    assert spec.default_clip_skip == {"sd1": 1, "sd2": 2, "sdxl": 2}[family]
    assert spec.text_encoder_layer == ("last" if family == "sd1" else "penultimate")
    assert spec.final_norm_on_hidden is (family != "sdxl")
    assert spec.vae_scale_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert spec.vae_downsample == 8
    assert spec.prediction_type_known is (family != "sd2")


def test_conversion_is_its_own_inverse(written):
    for family in ("sd1", "sd2", "sdxl"):
        path, _ = written(family, family)
        ldm = read_state_dict(path)
        spec = detect_checkpoint(ldm)
        parts = ldm_to_diffusers(ldm, spec)
        texts = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if family == "sdxl" else [])
        back = diffusers_to_ldm(parts["unet"], parts["vae"], texts, spec)
        assert set(back) == set(ldm)
        assert all(torch.equal(back[k], ldm[k]) for k in ldm)


def test_real_size_architectures_detected_from_shapes():
    """Full-size SD1.5 / SD2.1 / SDXL layouts (meta tensors, no memory): exact configs, same names as diffusers' converter."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=1)
    vit_h = dict(clip_l, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 hidden_act="gelu", pad_token_id=0)
    big_g = dict(vit_h, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280)
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215, use_quant_conv=True,
               use_post_quant_conv=True, mid_block_add_attention=True)
    sd1 = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
               layers_per_block=2, transformer_layers_per_block=[1, 1, 1, 1], cross_attention_dim=768,
               attention_head_dim=8, use_linear_projection=False, norm_num_groups=32)
    sd2 = dict(sd1, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    sdxl = dict(sample_size=128, in_channels=4, out_channels=4,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
                layers_per_block=2, transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                attention_head_dim=[5, 10, 20], use_linear_projection=True, norm_num_groups=32,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    cases = {"sd1": (sd1, vae, [(clip_l, CLIPTextModel)]), "sd2": (sd2, vae, [(vit_h, CLIPTextModel)]),
             "sdxl": (sdxl, dict(vae, scaling_factor=0.13025), [(clip_l, CLIPTextModel), (big_g, CLIPTextModelWithProjection)])}
    for family, (unet_cfg, vae_cfg, texts) in cases.items():
        with init_empty_weights():
            unet = UNet2DConditionModel(**unet_cfg)
            vae_m = AutoencoderKL(**vae_cfg)
            encoders = [cls(CLIPTextConfig(**cfg)) for cfg, cls in texts]
        spec = ModelSpec.for_family(family, unet_cfg, vae_cfg, [cfg for cfg, _ in texts])
        ldm = diffusers_to_ldm(unet.state_dict(), vae_m.state_dict(), [e.state_dict() for e in encoders], spec)
        # a few real-file key names, as A1111 checkpoints spell them
        for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias",
                    "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
                    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"):
            assert key in ldm, (family, key)
        detected = detect_checkpoint(ldm)
        assert detected.unet_config == unet_cfg, family
        assert detected.vae_config == vae_cfg, family
        assert detected.text_encoder_configs == [cfg for cfg, _ in texts], family
        assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
        if family != "sdxl":  # deepest level without attention: its upsampler is the block's second layer
            assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm
        assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm
        ours = ldm_to_diffusers(ldm, detected)
        theirs = single_file_utils.convert_ldm_unet_checkpoint(ldm, unet_cfg)
        assert set(theirs) == set(ours["unet"]) and all(theirs[k] is ours["unet"][k] for k in theirs), family
        assert set(single_file_utils.convert_ldm_vae_checkpoint(ldm, vae_cfg)) == set(ours["vae"]), family


# -- file formats --------------------------------------------------------------------------------
def test_ckpt_equals_safetensors(written, loaded):
    st_model, _ = loaded("sd1", "sd1")
    ckpt_path, _ = written("sd1-ckpt", "sd1", fmt="ckpt")
    assert ckpt_path.suffix == ".ckpt"
    ckpt_model = load_sd_model(ckpt_path)
    for part, module in _modules(st_model).items():
        other = _modules(ckpt_model)[part].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items())


def test_fp16_file_loads(written):
    path, originals = written("sd1-fp16", "sd1", dtype=torch.float16)
    raw = read_state_dict(path)
    assert raw["model.diffusion_model.out.2.weight"].dtype == torch.float16
    model = load_sd_model(path)  # upcast to float32
    _assert_same_weights(model, originals, convert=lambda t: t.half().float() if t.is_floating_point() else t)
    half = load_sd_model(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for m in _modules(half).values() for p in m.parameters())


def test_ema_keys_ignored(written):
    path, originals = written("sd1-ema", "sd1", ema=True)
    raw = read_state_dict(path)
    assert sum(k.startswith("model_ema.") for k in raw) > 100
    _assert_same_weights(load_sd_model(path), originals)


def test_safetensors_metadata(written):
    path, _ = written("sd1", "sd1")
    meta = read_safetensors_metadata(path)
    assert meta["easel_test_family"] == "sd1"


# -- errors a user can cause ---------------------------------------------------------------------
def test_unknown_architecture(tmp_path):
    from safetensors.torch import save_file
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), "single_blocks.0.linear1.weight": torch.zeros(2)}, str(flux))
    with pytest.raises(UserError) as e:
        load_sd_model(flux)
    assert "Flux" in e.value.message and "SDXL" in e.value.message and "Stable Diffusion 1.x" in e.value.message

    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(other))
    with pytest.raises(UserError, match=r"Unsupported model file.*foo\.weight"):
        load_sd_model(other)

    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1), "decoder.up.0.block.0.conv1.weight": torch.zeros(1)}, str(vae_only))
    with pytest.raises(UserError, match="VAE"):
        load_sd_model(vae_only)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found.*nothere.safetensors"):
        load_sd_model(tmp_path / "nothere.safetensors")
    with pytest.raises(UserError, match="nothere.ckpt"):
        read_state_dict(tmp_path / "nothere.ckpt")


def test_corrupt_files(tmp_path, written):
    good, _ = written("sd1", "sd1")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_sd_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 12) + b"not json at all" * 10)
    with pytest.raises(UserError, match="garbage.safetensors.*not a valid"):
        read_state_dict(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.safetensors"):
        read_state_dict(empty)

    ckpt, _ = written("sd1-ckpt", "sd1", fmt="ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(UserError, match="cut.ckpt.*corrupt"):
        load_sd_model(cut)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x02junk" * 50)
    with pytest.raises(UserError, match="junk.ckpt"):
        read_state_dict(junk)


class Sneaky:
    """Stands for any class a pickle would have to import and build."""

    def __reduce__(self):
        return (print, ("this must never run",))


class Custom:
    def __init__(self):
        self.value = 1


def test_ckpt_with_python_objects_refused(tmp_path, capsys):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Custom()}, path)
    with pytest.raises(UserError) as e:
        read_state_dict(path)
    assert "custom.ckpt" in e.value.message and "Python objects" in e.value.message and ".safetensors" in e.value.message

    path2 = tmp_path / "sneaky.ckpt"
    with open(path2, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Sneaky()}, f, protocol=2)
    with pytest.raises(UserError, match="sneaky.ckpt"):
        read_state_dict(path2)
    assert "this must never run" not in capsys.readouterr().out


def test_lightning_bookkeeping_in_old_ckpt_is_tolerated(tmp_path):
    """Old SD .ckpt files carry a pytorch_lightning ModelCheckpoint callback; it is read as an inert stand-in."""
    import types
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "pytorch_lightning.callbacks", name)}
    try:
        for k in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            sys.modules[k] = types.ModuleType(k)
        sys.modules[name] = fake
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 470000,
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert torch.equal(read_state_dict(path)["w"], torch.ones(3))


def test_missing_tensor_is_reported(tmp_path, written):
    from safetensors.torch import save_file
    path, _ = written("sd1", "sd1")
    sd = read_state_dict(path)
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.input_blocks.1.1.bogus.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(UserError) as e:
        load_sd_model(broken)
    assert "conv_out.bias" in e.value.message and "bogus" in e.value.message


# -- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_ids(tmp_path):
    tok = clip_tokenizer("clip_l", cache_dir=tmp_path / "tok")
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token_id == 49407
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    assert tok("masterpiece, best quality", add_special_tokens=False)["input_ids"] == [12066, 267, 949, 3027]
    g = clip_tokenizer("clip_g", cache_dir=tmp_path / "tok")
    assert g.pad_token_id == 0 and g.convert_ids_to_tokens(0) == "!"
    assert g("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer("clip_l", cache_dir=tmp_path / "tok") is tok
    with pytest.raises(ValueError):
        clip_tokenizer("t5")


def test_loaded_model_tokenizers(loaded):
    sdxl, _ = loaded("sdxl", "sdxl")
    assert [t.pad_token_id for t in sdxl.tokenizers] == [49407, 0]
    sd2, _ = loaded("sd2", "sd2")
    assert sd2.tokenizers[0].pad_token_id == 0


# -- the loaded modules compute what the originals do ----------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_forward_matches_original(loaded, family):
    model, originals = loaded(family, family)
    orig = originals["modules"]
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    hidden = []
    for mine, theirs in zip(model.text_encoders, orig["text_encoders"]):
        a = mine(input_ids=ids, output_hidden_states=True)
        b = theirs(input_ids=ids, output_hidden_states=True)
        assert torch.allclose(a.last_hidden_state, b.last_hidden_state, rtol=1e-5, atol=1e-6)
        assert len(a.hidden_states) == len(b.hidden_states) == mine.config.num_hidden_layers + 1
        assert torch.allclose(a.hidden_states[-2], b.hidden_states[-2], rtol=1e-5, atol=1e-6)
        assert a.last_hidden_state.abs().mean() > 0.1
        hidden.append(a.hidden_states[-2])
    context = torch.cat(hidden, dim=-1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    kwargs = {}
    if family == "sdxl":
        pooled = model.text_encoders[1](input_ids=ids).text_embeds
        assert pooled.shape == (1, 32)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    out = model.unet(x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
    ref = orig["unet"](x, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
    # same weights; CPU kernels may pick different blockings for differently aligned buffers
    assert out.shape == x.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5) and out.abs().mean() > 0.01

    z = torch.randn(1, 4, 8, 8, generator=g)
    img = model.vae.decode(z).sample
    assert img.shape == (1, 3, 64, 64) and torch.allclose(img, orig["vae"].decode(z).sample, rtol=1e-4, atol=1e-5)
    mean = model.vae.encode(img).latent_dist.mean
    assert mean.shape == (1, 4, 8, 8) and torch.allclose(mean, orig["vae"].encode(img).latent_dist.mean, rtol=1e-4, atol=1e-5)


def test_openclip_mapping_matches_open_clip_reference():
    """The OpenCLIP text tower converted to transformers computes what open_clip computes (SD2 / SDXL encoder 2)."""
    from open_clip.transformer import TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from backend.engine.ldm_convert import hf_to_openclip, openclip_to_hf

    torch.manual_seed(0)
    ref = TextTransformer(context_length=77, vocab_size=49408, width=64, heads=1, layers=2, output_dim=32,
                          output_tokens=True).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sd = ref.state_dict()
    converted, unknown = openclip_to_hf(sd, with_projection=True)
    assert unknown == []
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0)).eval()
    model.load_state_dict(converted, strict=True)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.no_grad():
        pooled, tokens = ref(ids)
        out = model(input_ids=ids)
    assert torch.allclose(out.last_hidden_state, tokens, atol=1e-5)
    assert torch.allclose(out.text_embeds, pooled, atol=1e-5)
    back = hf_to_openclip(model.state_dict())
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# -- prediction type, schedule ---------------------------------------------------------------------
def test_sd2_prediction_type_from_yaml(written, folder):
    path, _ = written("sd2", "sd2")
    v_path = folder / "sd2-v.safetensors"
    v_path.write_bytes(path.read_bytes())
    v_path.with_suffix(".yaml").write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n'
                                           '  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    assert load_sd_model(v_path).prediction_type == "v_prediction"
    eps_path = folder / "sd2-eps.safetensors"
    eps_path.write_bytes(path.read_bytes())
    eps_path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert load_sd_model(eps_path).prediction_type == "epsilon"


def test_sd2_prediction_type_heuristic(loaded):
    model, _ = loaded("sd2", "sd2")
    assert model.prediction_type == ("v_prediction" if guess_v_prediction(model.unet, 64) else "epsilon")
    unet = model.unet
    saved_w, saved_b = unet.conv_out.weight.clone(), unet.conv_out.bias.clone()
    try:
        with torch.no_grad():
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.fill_(-2.0)  # output - input = -2.5: what a v model does at t=999
        assert guess_v_prediction(unet, 64) is True
        with torch.no_grad():
            unet.conv_out.bias.fill_(0.4)  # output close to the input: an epsilon model
        assert guess_v_prediction(unet, 64) is False
    finally:
        with torch.no_grad():
            unet.conv_out.weight.copy_(saved_w)
            unet.conv_out.bias.copy_(saved_b)


def test_v_pred_marker_key(tmp_path, written):
    from safetensors.torch import save_file
    path, _ = written("sd1", "sd1")
    sd = read_state_dict(path)
    sd["v_pred"] = torch.tensor([])
    marked = tmp_path / "vpred.safetensors"
    save_file(sd, str(marked))
    assert load_sd_model(marked).prediction_type == "v_prediction"


def test_alphas_cumprod(loaded):
    model, _ = loaded("sd1", "sd1")
    ac = model.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert abs(ac[0].item() - (1 - 0.00085)) < 1e-6
    assert abs(ac[-1].item() - 0.0046) < 1e-4  # SD's final alpha-bar (sigma_max ~ 14.6)
    assert torch.all(ac[1:] < ac[:-1])
    z = sd_alphas_cumprod(zero_terminal_snr=True)
    assert z[-1].item() < 1e-7 and abs(z[0].item() - ac[0].item()) < 1e-6


# -- VAE files -----------------------------------------------------------------------------------
def test_vae_files_and_swapping(tmp_path, written, loaded):
    from safetensors.torch import save_file
    model, _ = loaded("sd1", "sd1")
    # a second tiny SD1 gives a different VAE of the same shape
    alt_path = tmp_path / "alt.safetensors"
    alt = write_tiny_checkpoint(alt_path, "sd1", seed=99)
    ldm = read_state_dict(alt_path)
    vae_ldm = {k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")}

    with_prefix = tmp_path / "with-prefix.safetensors"
    save_file({k: v for k, v in ldm.items() if k.startswith("first_stage_model.")}, str(with_prefix))
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": vae_ldm, "loss.discriminator.weight": torch.zeros(1)}, bare)
    diffusers_layout = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(alt["vae"], str(diffusers_layout))
    for f in (with_prefix, bare, diffusers_layout):
        sd = load_vae_file(f)
        assert set(sd) == set(alt["vae"]) and all(torch.equal(sd[k], alt["vae"][k]) for k in sd), f.name

    own = {k: v.clone() for k, v in model.vae.state_dict().items()}
    apply_vae_state_dict(model, load_vae_file(with_prefix))
    assert all(torch.equal(model.vae.state_dict()[k], alt["vae"][k]) for k in own)
    apply_vae_state_dict(model, own)
    assert all(torch.equal(model.vae.state_dict()[k], own[k]) for k in own)

    sdxl, _ = loaded("sdxl", "sdxl")
    wrong = {k: v for k, v in sdxl.vae.state_dict().items() if "mid_block" not in k}
    with pytest.raises(UserError, match="does not fit"):
        apply_vae_state_dict(model, wrong)

    swapped = load_sd_model(written("sd1")[0], vae_path=with_prefix)
    assert all(torch.equal(swapped.vae.state_dict()[k], alt["vae"][k]) for k in own)
    not_a_vae = tmp_path / "nope.safetensors"
    save_file({"foo": torch.zeros(1)}, str(not_a_vae))
    with pytest.raises(UserError, match="nope.safetensors"):
        load_vae_file(not_a_vae)

