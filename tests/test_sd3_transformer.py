"""Stable Diffusion 3 / 3.5: detection, variants, config from shapes, transformer loading, the single file's
parts and the 16-channel VAE, on tiny files in Stability AI's layout (tests/flow_factory.write_sd3)."""
from __future__ import annotations

import pytest
import torch

from backend.core.errors import UserError
from backend.engine.families import flow_vae, sd3
from backend.engine.state_dict_io import read_state_dict
from flow_factory import (FLOW_VAE_CONFIG, flow_vae_ldm, sd3_transformer_config, tiny_flow_vae, write_sd3)

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """One tiny all-in-one file per variant: {variant: (path, built modules)}."""
    folder = tmp_path_factory.mktemp("sd3")
    return {v: (folder / f"{v}.safetensors", write_sd3(folder / f"{v}.safetensors", variant=v, seed=i))
            for i, v in enumerate(VARIANTS)}


def _inputs(config: dict, *, height: int = 8, width: int = 12, tokens: int = 5):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 16, height, width, generator=g),
            torch.randn(1, tokens, config["joint_attention_dim"], generator=g),
            torch.randn(1, config["pooled_projection_dim"], generator=g), torch.tensor([700.0]))


@torch.no_grad()
def _run(model, inputs, **kw) -> torch.Tensor:
    x, context, pooled, t = inputs
    return model(x, context, pooled, t, **kw).sample


# -- detection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_detection_variant_and_config_from_shapes(sd3_files, variant):
    path, built = sd3_files[variant]
    sd = read_state_dict(path)
    assert sd3.is_sd3(sd.keys())
    assert sd3.is_sd3(built["sai"].keys())  # without the prefix too
    assert sd3.sd3_variant(sd) == variant
    assert sd3.sd3_variant(built["sai"]) == variant
    config = sd3.sd3_config(sd)
    expected = sd3_transformer_config(variant)
    assert {k: v for k, v in config.items() if k != "sample_size"} == \
           {k: v for k, v in expected.items() if k != "sample_size"}
    assert config["sample_size"] == 128  # the published configs' (1024 px); the file's table replaces the rest
    assert config["dual_attention_layers"] == ((0,) if variant == "sd3.5-medium" else ())
    assert config["qk_norm"] == (None if variant == "sd3-medium" else "rms_norm")


def test_other_files_are_not_sd3(tmp_path):
    from model_factory import write_tiny_checkpoint
    write_tiny_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    assert not sd3.is_sd3(read_state_dict(tmp_path / "sd1.safetensors").keys())
    flux_keys = ["img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
                 "single_blocks.0.linear1.weight", "final_layer.linear.weight"]
    assert not sd3.is_sd3(flux_keys)
    assert not sd3.is_sd3(["model.diffusion_model." + k for k in flux_keys])


def test_real_size_shapes_give_the_published_configs():
    """Shapes of the real files (meta tensors: no memory) -> the configs of SD 3 Medium / 3.5 Large / 3.5 Medium."""
    def fake(depth: int, hidden: int, qk: bool, dual: int, grid: int) -> dict:
        m = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
        sd = {"pos_embed": m(1, grid * grid, hidden), "x_embedder.proj.weight": m(hidden, 16, 2, 2),
              "context_embedder.weight": m(hidden, 4096), "y_embedder.mlp.0.weight": m(hidden, 2048),
              "final_layer.linear.weight": m(64, hidden)}
        for i in range(depth):
            sd[f"joint_blocks.{i}.x_block.attn.qkv.weight"] = m(3 * hidden, hidden)
            if qk:
                sd[f"joint_blocks.{i}.x_block.attn.ln_q.weight"] = m(64)
            if i < dual:
                sd[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = m(3 * hidden, hidden)
        return {"model.diffusion_model." + k: v for k, v in sd.items()}

    medium3 = sd3.sd3_config(fake(24, 1536, False, 0, 192))
    assert (medium3["num_layers"], medium3["num_attention_heads"], medium3["attention_head_dim"]) == (24, 24, 64)
    assert (medium3["pos_embed_max_size"], medium3["qk_norm"], medium3["caption_projection_dim"]) == (192, None, 1536)
    assert (medium3["joint_attention_dim"], medium3["pooled_projection_dim"]) == (4096, 2048)
    assert medium3["out_channels"] == 16
    large = sd3.sd3_config(fake(38, 2432, True, 0, 192))
    assert (large["num_layers"], large["num_attention_heads"], large["qk_norm"]) == (38, 38, "rms_norm")
    medium35 = sd3.sd3_config(fake(24, 1536, True, 13, 384))
    assert medium35["dual_attention_layers"] == tuple(range(13)) and medium35["pos_embed_max_size"] == 384
    assert sd3.sd3_variant(fake(24, 1536, False, 0, 192)) == "sd3-medium"
    assert sd3.sd3_variant(fake(38, 2432, True, 0, 192)) == "sd3.5-large"
    assert sd3.sd3_variant(fake(24, 1536, True, 13, 384)) == "sd3.5-medium"


# -- loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_loaded_transformer_matches_diffusers_module(sd3_files, variant):
    path, built = sd3_files[variant]
    sd = read_state_dict(path)
    keys_before = set(sd)
    model = sd3.load_sd3_transformer(sd, dtype=torch.float32, device="cpu")
    assert set(sd) == keys_before  # the caller's dict is left alone
    reference = built["transformer"]
    mine, theirs = model.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    inputs = _inputs(reference.config)
    out = _run(model, inputs)
    assert out.shape == (1, 16, 8, 12)
    torch.testing.assert_close(out, _run(reference, inputs), rtol=1e-5, atol=1e-5)
    # skip-layer guidance's pass: the same blocks skipped give the same result, and it differs from the full pass
    skipped = _run(model, inputs, skip_layers=[0])
    torch.testing.assert_close(skipped, _run(reference, inputs, skip_layers=[0]), rtol=1e-5, atol=1e-5)
    assert (skipped - out).abs().max() > 1e-3


def test_bf16_load_and_transformer_only_file_without_prefix(tmp_path):
    built = write_sd3(tmp_path / "bare.safetensors", variant="sd3.5-large", with_encoders=False, with_vae=False,
                      prefixed=False, weights="bf16")
    sd = read_state_dict(tmp_path / "bare.safetensors")
    assert not any(k.startswith("model.diffusion_model.") for k in sd)
    parts = sd3.split_sd3_checkpoint(sd)
    assert set(parts) == {"transformer"} and parts["transformer"].keys() == sd.keys()
    model = sd3.load_sd3_transformer(parts["transformer"], dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = built["transformer"]
    expected = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weights", ["fp8", "fp8_scaled"])
def test_float8_files_are_upcast(tmp_path, weights):
    built = write_sd3(tmp_path / f"{weights}.safetensors", variant="sd3.5-medium", with_encoders=False,
                      weights=weights)
    sd = read_state_dict(tmp_path / f"{weights}.safetensors")
    key = "model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"
    assert sd[key].dtype == torch.float8_e4m3fn
    model = sd3.load_sd3_transformer(sd, dtype=torch.float32, device="cpu")
    loaded = model.transformer_blocks[0].ff.net[0].proj.weight
    assert loaded.dtype == torch.float32
    stored = sd[key].to(torch.float32)
    if weights == "fp8_scaled":
        stored = stored * sd[key[:-len("weight")] + "scale_weight"].float()
    assert torch.equal(loaded, stored)
    original = built["sai"]["joint_blocks.0.x_block.mlp.fc1.weight"]
    assert (loaded - original).abs().max() <= 0.07 * original.abs().max()  # e4m3's precision
    inputs = _inputs(built["transformer"].config)
    reference = _run(built["transformer"], inputs)
    assert (_run(model, inputs) - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_damaged_or_unknown_transformers_are_refused(sd3_files):
    path, _ = sd3_files["sd3.5-large"]
    sd = read_state_dict(path)
    transformer = sd3.split_sd3_checkpoint(sd)["transformer"]

    missing = {k: v for k, v in transformer.items() if not k.startswith("y_embedder.mlp.2.")}
    with pytest.raises(UserError, match="missing y_embedder.mlp.2"):
        sd3.load_sd3_transformer(missing, dtype=torch.float32)

    gap = {k: v for k, v in transformer.items() if not k.startswith("joint_blocks.0.")}
    with pytest.raises(UserError, match=r"lacks joint blocks \[0\]"):
        sd3.sd3_config(gap)

    extra = dict(transformer, **{"joint_blocks.0.x_block.mystery.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="does not know"):
        sd3.load_sd3_transformer(extra, dtype=torch.float32)
    stray = dict(transformer, **{"training_step": torch.zeros(())})  # outside the blocks: ignored
    assert "training_step" not in sd3.load_sd3_transformer(stray, dtype=torch.float32).state_dict()

    class Packed(torch.Tensor):  # what a GGUF reader's quantized tensors look like to this loader
        pass

    packed = dict(transformer)
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    packed[qkv] = packed[qkv].as_subclass(Packed)
    with pytest.raises(UserError, match="quantized"):
        sd3.load_sd3_transformer(packed, dtype=torch.float32)


def test_skip_layer_guidance_defaults():
    assert sd3.SLG_DEFAULT_LAYERS == (7, 8, 9)
    assert 0 <= sd3.SLG_DEFAULT_START < sd3.SLG_DEFAULT_END <= 1 and sd3.SLG_DEFAULT_SCALE > 0
    assert sd3.SD3_SHIFT == 3.0


# -- the file's parts ---------------------------------------------------------------------------------
def test_split_with_encoders_gives_loadable_parts(sd3_files):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    path, built = sd3_files["sd3.5-medium"]
    parts = sd3.split_sd3_checkpoint(read_state_dict(path))
    assert set(parts) == {"transformer", "vae", "clip_l", "clip_g", "t5xxl"}
    assert sd3.is_sd3(parts["transformer"].keys()) and "pos_embed" in parts["transformer"]
    assert "encoder.down.0.block.0.conv1.weight" in parts["vae"]
    assert "text_model.embeddings.token_embedding.weight" in parts["clip_l"]
    assert "text_projection.weight" in parts["clip_g"]
    assert "shared.weight" in parts["t5xxl"] and "encoder.block.0.layer.0.SelfAttention.q.weight" in parts["t5xxl"]
    # the parts carry transformers' own names: they load strictly into the modules they came from
    for name, cls in (("clip_l", CLIPTextModelWithProjection), ("clip_g", CLIPTextModelWithProjection),
                      ("t5xxl", T5EncoderModel)):
        module = cls(built[name].config)
        missing, unexpected = module.load_state_dict(parts[name], strict=False)
        assert not unexpected and all(k.endswith("position_ids") or k == "encoder.embed_tokens.weight" for k in missing)
        for key, value in parts[name].items():
            assert torch.equal(value, built[name].state_dict()[key])


def test_split_without_encoders(tmp_path):
    write_sd3(tmp_path / "no-te.safetensors", variant="sd3-medium", with_encoders=False)
    parts = sd3.split_sd3_checkpoint(read_state_dict(tmp_path / "no-te.safetensors"))
    assert set(parts) == {"transformer", "vae"}
    assert not any(k.startswith("model.diffusion_model.") for k in parts["transformer"])
    write_sd3(tmp_path / "alone.safetensors", variant="sd3-medium", with_encoders=False, with_vae=False)
    assert set(sd3.split_sd3_checkpoint(read_state_dict(tmp_path / "alone.safetensors"))) == {"transformer"}


# -- the 16-channel VAE -------------------------------------------------------------------------------
def test_sd3_vae_loads_and_matches_diffusers_module(sd3_files):
    path, built = sd3_files["sd3-medium"]
    vae_sd = sd3.split_sd3_checkpoint(read_state_dict(path))["vae"]
    config = flow_vae.vae_config_from_tensors(vae_sd, family="sd3")
    assert config["latent_channels"] == 16
    assert config["use_quant_conv"] is False and config["use_post_quant_conv"] is False
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5305, 0.0609)
    assert config["block_out_channels"] == FLOW_VAE_CONFIG["block_out_channels"]
    vae = flow_vae.load_flow_vae(vae_sd, family="sd3", dtype=torch.float32, device="cpu")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    reference = built["vae"]
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
        assert latents.shape == (1, 16, 8, 6)
        torch.testing.assert_close(latents, reference.encode(image).latent_dist.mean, rtol=1e-5, atol=1e-5)
        decoded = vae.decode(latents).sample
        assert decoded.shape == (1, 3, 64, 48)
        torch.testing.assert_close(decoded, reference.decode(latents).sample, rtol=1e-5, atol=1e-5)


def test_flux_vae_factors_and_layouts():
    vae = tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159, seed=5)
    ldm = flow_vae_ldm(vae)
    expected = vae.state_dict()
    # ComfyUI's all-in-one prefix, ae.safetensors (LDM names), the diffusers layout
    for layout in ({"vae." + k: v for k, v in ldm.items()}, ldm, dict(vae.state_dict())):
        loaded = flow_vae.load_flow_vae(layout, family="flux", dtype=torch.float32)
        assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (0.3611, 0.1159)
        assert loaded.config.latent_channels == 16
        got = loaded.state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_four_channel_vae_is_refused(tmp_path):
    from model_factory import write_tiny_checkpoint
    write_tiny_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    sd = read_state_dict(tmp_path / "sd1.safetensors")
    with pytest.raises(UserError, match="4 latent channels.*Stable Diffusion 3 needs a VAE with 16"):
        flow_vae.load_flow_vae(sd, family="sd3")
    with pytest.raises(UserError, match="no VAE"):
        flow_vae.vae_config_from_tensors({"foo.weight": torch.zeros(1)})
