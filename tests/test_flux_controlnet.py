"""FLUX.1 ControlNets (InstantX / Shakker-Labs union in diffusers' layout, XLabs' own layout): detection from the
file's header, exact loading, residuals equal to diffusers' FluxControlNetModel's as the transformer applies them,
weight 0 and union modes, the ControlNet unit flow (preprocessor -> union mode, VAE-encoded control latents, the
sampling hook) and the family checks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from backend.controlnet.model_files import ControlNetRegistry, detect_controlnet
from backend.controlnet.service import checkpoint_family
from backend.controlnet.units import ControlUnit, UnitJob
from backend.core.errors import UserError
from backend.core.options import SETTINGS
from backend.core.tensor_headers import read_shapes
from backend.engine.controlnet.apply import ActiveControl, ControlSet
from backend.engine.controlnet.model_files import load_controlnet
from backend.engine.controlnet.runtime import ControlNetCache, flux_encoder, prepare_controls
from backend.engine.controlnet.script import ControlNetHook
from backend.engine.families.flux_controlnet import (UNION_MODES, control_input, flux_controlnet_residuals, image_ids,
                                                     pack_latents, union_mode)
from backend.engine.sampling_hooks import FIRST_PASS, BlockResiduals, HookChain, StepState, UNetCall
from controlnet_factory import write_tiny_controlnet
from flow_factory import (tiny_flow_vae, tiny_flux_controlnet, tiny_flux_deeper, write_flux_bfl,
                          write_flux_controlnet_instantx, write_flux_controlnet_xlabs)

torch.set_num_threads(1)

LAYERS, SINGLES = 3, 4  # the test transformer's blocks: more than the ControlNets' outputs, to see the mapping
W = H = 64  # pixels; latents 8x8, 16 tokens of 64 channels


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_controlnets")
    refs = {
        "instantx": (folder / "FLUX.1-dev-Controlnet-Canny.safetensors", write_flux_controlnet_instantx(
            folder / "FLUX.1-dev-Controlnet-Canny.safetensors", union=False, seed=1)),
        "union": (folder / "FLUX.1-dev-ControlNet-Union-Pro.safetensors", write_flux_controlnet_instantx(
            folder / "FLUX.1-dev-ControlNet-Union-Pro.safetensors", union=True, seed=2, dtype=torch.bfloat16)),
        "xlabs": (folder / "flux-canny-controlnet-v3.safetensors", write_flux_controlnet_xlabs(
            folder / "flux-canny-controlnet-v3.safetensors", seed=3)),
        # Shakker-Labs' Union Pro 2.0: no mode embedding, double blocks only
        "pro2": (folder / "FLUX.1-dev-ControlNet-Union-Pro-2.0.safetensors", write_flux_controlnet_instantx(
            folder / "FLUX.1-dev-ControlNet-Union-Pro-2.0.safetensors", union=False, single_layers=0, seed=4)),
    }
    return folder, refs


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_deeper(LAYERS, SINGLES, seed=5)


def call_inputs(batch: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, (H // 16) * (W // 16), 64, generator=gen),
            "timestep": torch.full((batch,), 0.6), "guidance": torch.full((batch,), 3.5),
            "pooled_projections": torch.randn(batch, 16, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=gen),
            "img_ids": image_ids(H // 8, W // 8), "txt_ids": torch.zeros(5, 3)}


def run_transformer(transformer, inputs: dict, **residuals) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False, **residuals)[0]


def control_image() -> Image.Image:
    img = Image.new("RGB", (W, H), "black")
    ImageDraw.Draw(img).rectangle((12, 20, 50, 44), fill="white")
    return img


# -- detection and loading --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,layout,num_mode,hint", [("instantx", "diffusers", None, None),
                                                       ("union", "diffusers", 7, None), ("xlabs", "xlabs", None, 16),
                                                       ("pro2", "diffusers", None, None)])
def test_detect_and_load_exactly(files, kind, layout, num_mode, hint):
    path, ref = files[1][kind]
    info = detect_controlnet(read_shapes(path))  # from the header only
    assert info.family == "flux" and info.family_name == "FLUX.1"
    assert info.layout == layout
    assert info.config["num_mode"] == num_mode and info.union == (num_mode is not None)
    assert info.config["conditioning_embedding_channels"] == hint
    assert info.config["num_layers"] == 2 and info.config["num_single_layers"] == (0 if kind in ("xlabs", "pro2") else 1)
    model, info2 = load_controlnet(path)
    assert type(model).__name__ == "FluxControlNetModel" and info2.family == "flux"
    dtype = torch.bfloat16 if kind == "union" else torch.float32
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(dtype).float()), k


def test_listed_for_flux_checkpoints_only(files, tmp_path):
    folder, _ = files
    write_tiny_controlnet(folder / "control_v11p_sd15_canny.pth", "sd1")
    reg = ControlNetRegistry([folder])
    flux = sorted(t.split(" [")[0] for t in reg.titles_for("flux"))
    assert flux == ["FLUX.1-dev-ControlNet-Union-Pro", "FLUX.1-dev-ControlNet-Union-Pro-2.0",
                    "FLUX.1-dev-Controlnet-Canny", "flux-canny-controlnet-v3"]
    assert [t.split(" [")[0] for t in reg.titles_for("sd1")] == ["control_v11p_sd15_canny"]
    assert checkpoint_family(write_flux_bfl(tmp_path / "flux1-dev.safetensors")) == "flux"
    assert checkpoint_family(write_flux_bfl(tmp_path / "aio.safetensors", prefix="model.diffusion_model.")) == "flux"


def test_union_models_are_offered_for_their_control_types():
    from backend.core import control_types
    titles = ["None", "FLUX.1-dev-ControlNet-Union-Pro [aa]", "flux-canny-controlnet-v3 [bb]"]
    assert control_types.models_for("Canny", titles) == titles
    assert control_types.models_for("Depth", titles) == ["None", "FLUX.1-dev-ControlNet-Union-Pro [aa]"]
    assert control_types.models_for("Lineart", titles) == ["None"]


def test_damaged_xlabs_file_is_a_clear_error(files, tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(files[1]["xlabs"][0]))
    del sd["input_hint_block.6.weight"], sd["input_hint_block.6.bias"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="hint encoder has convolutions"):
        detect_controlnet(read_shapes(tmp_path / "broken.safetensors"))


# -- residuals --------------------------------------------------------------------------------------
def test_instantx_residuals_equal_diffusers_and_steer_the_transformer(files, transformer):
    path, ref = files[1]["instantx"]
    model, _ = load_controlnet(path)
    inputs = call_inputs()
    control = torch.randn(1, inputs["hidden_states"].shape[1], 64, generator=torch.Generator().manual_seed(9))
    ours = flux_controlnet_residuals(model, control, **inputs, weight=0.7, transformer_layers=LAYERS,
                                     transformer_single_layers=SINGLES)
    with torch.no_grad():
        blocks, singles = ref(inputs["hidden_states"], controlnet_cond=control.expand(2, -1, -1), conditioning_scale=0.7,
                              encoder_hidden_states=inputs["encoder_hidden_states"],
                              pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                              img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
                              return_dict=False)
    assert isinstance(ours["controlnet_block_samples"], BlockResiduals)
    assert len(ours["controlnet_block_samples"]) == LAYERS and len(ours["controlnet_single_block_samples"]) == SINGLES
    # 2 double outputs over 3 blocks: ceil(3/2) = 2 blocks each, as diffusers maps them; 1 single output for all 4
    for i in range(LAYERS):
        torch.testing.assert_close(ours["controlnet_block_samples"][i], blocks[i // 2], rtol=1e-5, atol=1e-6)
    for i in range(SINGLES):
        torch.testing.assert_close(ours["controlnet_single_block_samples"][i], singles[0], rtol=1e-5, atol=1e-6)

    plain = run_transformer(transformer, inputs)
    with_ours = run_transformer(transformer, inputs, **ours)
    with_diffusers = run_transformer(transformer, inputs, controlnet_block_samples=blocks,
                                     controlnet_single_block_samples=singles)
    torch.testing.assert_close(with_ours, with_diffusers, rtol=1e-5, atol=1e-5)
    assert (with_ours - plain).abs().max() > 1e-2
    zero = flux_controlnet_residuals(model, control, **inputs, weight=0.0, transformer_layers=LAYERS,
                                     transformer_single_layers=SINGLES)
    assert torch.equal(run_transformer(transformer, inputs, **zero), plain)


def test_bfloat16_residuals_run_in_a_bfloat16_transformer(files, transformer):
    path, _ = files[1]["pro2"]
    model, _ = load_controlnet(path, dtype=torch.bfloat16)
    inputs = call_inputs()
    control = torch.randn(1, inputs["hidden_states"].shape[1], 64, generator=torch.Generator().manual_seed(6))
    ours = flux_controlnet_residuals(model, control, **inputs, transformer_layers=LAYERS, transformer_single_layers=SINGLES,
                                     out_dtype=torch.bfloat16)
    assert "controlnet_single_block_samples" not in ours  # double blocks only (Union Pro 2.0)
    assert ours["controlnet_block_samples"][2].dtype == torch.bfloat16
    bf16 = tiny_flux_deeper(LAYERS, SINGLES, seed=5).to(torch.bfloat16)
    low = {k: v.to(torch.bfloat16) if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
    out = run_transformer(bf16, low, **ours)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - run_transformer(bf16, low).float()).abs().max() > 1e-2


def test_union_mode_reaches_the_model(files):
    path, ref = files[1]["union"]
    model, _ = load_controlnet(path)
    inputs = call_inputs()
    control = torch.randn(1, inputs["hidden_states"].shape[1], 64, generator=torch.Generator().manual_seed(4))
    common = dict(transformer_layers=LAYERS, transformer_single_layers=SINGLES)
    canny = flux_controlnet_residuals(model, control, **inputs, mode=UNION_MODES["canny"], **common)
    depth = flux_controlnet_residuals(model, control, **inputs, mode=UNION_MODES["depth"], **common)
    assert (canny["controlnet_block_samples"][0] - depth["controlnet_block_samples"][0]).abs().max() > 1e-3
    with torch.no_grad():  # diffusers' own union call with mode 2 (the loaded weights are the bf16 file's)
        ref_b = ref.to(torch.bfloat16).float()
        blocks, _ = ref_b(inputs["hidden_states"], controlnet_cond=control.expand(2, -1, -1),
                          controlnet_mode=torch.full((2, 1), 2), encoder_hidden_states=inputs["encoder_hidden_states"],
                          pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                          img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
                          return_dict=False)
    torch.testing.assert_close(depth["controlnet_block_samples"][0], blocks[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="needs a control mode"):
        flux_controlnet_residuals(model, control, **inputs, mode=None, **common)
    assert union_mode("canny", "Canny") == 0 and union_mode("depth_anything", "Depth") == 2
    assert union_mode("tile_resample", "Tile") == 1 and union_mode("blur_gaussian", "Tile") == 3
    assert union_mode("openpose", "OpenPose") == 4 and union_mode("lineart", "Lineart") is None


def test_xlabs_reads_pixels_and_repeats_over_blocks(files, transformer):
    path, ref = files[1]["xlabs"]
    model, _ = load_controlnet(path)
    inputs = call_inputs(seed=2)
    hint = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    control = control_input(model, hint, None)
    assert torch.equal(control, hint * 2 - 1)  # x-flux takes the picture in [-1, 1]
    ours = flux_controlnet_residuals(model, control, **inputs, weight=0.8, transformer_layers=LAYERS,
                                     transformer_single_layers=SINGLES)
    assert "controlnet_single_block_samples" not in ours
    with torch.no_grad():
        blocks, singles = ref(inputs["hidden_states"], controlnet_cond=control.expand(2, -1, -1, -1),
                              conditioning_scale=0.8, encoder_hidden_states=inputs["encoder_hidden_states"],
                              pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                              img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=inputs["guidance"],
                              return_dict=False)
    assert singles is None
    for i in range(LAYERS):  # block i takes output i mod 2, as x-flux adds them
        torch.testing.assert_close(ours["controlnet_block_samples"][i], blocks[i % 2], rtol=1e-5, atol=1e-6)
    with_ours = run_transformer(transformer, inputs, **ours)
    with_diffusers = run_transformer(transformer, inputs, controlnet_block_samples=blocks, controlnet_blocks_repeat=True)
    torch.testing.assert_close(with_ours, with_diffusers, rtol=1e-5, atol=1e-5)
    assert (with_ours - run_transformer(transformer, inputs)).abs().max() > 1e-2


def test_instantx_control_latents_are_the_shifted_scaled_vae_mean():
    vae = tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    flow = SimpleNamespace(vae=vae, vae_scale_factor=0.3611, vae_shift_factor=0.1159)
    hint = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    got = control_input(tiny_flux_controlnet(), hint, flux_encoder(flow, "cpu"))
    with torch.no_grad():
        mean = vae.encode(hint * 2 - 1).latent_dist.mean
    want = pack_latents((mean - 0.1159) * 0.3611)
    assert got.shape == (1, (H // 16) * (W // 16), 64)
    torch.testing.assert_close(got, want)


def test_block_residuals_of_two_hooks_sum_per_block():
    a = [torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 2.0)]
    b = [torch.full((1, 2, 4), 10.0)]
    spread = BlockResiduals.spread(a, 3)
    repeat = BlockResiduals.spread(a, 3, repeat=True)
    assert [float(t[0, 0, 0]) for t in spread] == [1.0, 1.0, 2.0]
    assert [float(t[0, 0, 0]) for t in repeat] == [1.0, 2.0, 1.0]
    total = spread + BlockResiduals.spread(b, 3)
    assert [float(t[0, 0, 0]) for t in total] == [11.0, 11.0, 12.0]

    class Fixed(ControlNetHook.__mro__[1]):  # a plain SamplingHook giving fixed residuals
        def __init__(self, value):
            self.value = value

        def residuals(self, state, call):
            return {"controlnet_block_samples": self.value}

    chain = HookChain([Fixed(spread), Fixed(repeat)])
    state = StepState(FIRST_PASS, 0, 4, W, H)
    call = UNetCall(sample=torch.zeros(1, 2, 4), timestep=torch.zeros(1), context=torch.zeros(1, 1, 4))
    summed = chain.residuals(state, call)["controlnet_block_samples"]
    assert [float(t[0, 0, 0]) for t in summed] == [2.0, 3.0, 3.0]


# -- the unit flow ----------------------------------------------------------------------------------
class Policy:
    device = torch.device("cpu")
    dtype = torch.float32

    def place_beside(self, module, loaded):
        pass

    def release_beside(self, module, loaded):
        pass


class Loaded:  # the checkpoint the ControlNets are placed beside (weakly referenced by the cache)
    def __init__(self):
        self.companions = {}


def flux_ctx(transformer, family="flux"):
    vae = tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    model = SimpleNamespace(family=family, unet=transformer, transformer=transformer, vae=vae,
                            vae_scale_factor=0.3611, vae_shift_factor=0.1159)
    opts = {s.key: s.default for s in SETTINGS}
    return SimpleNamespace(model=model, options=opts, extra_params={}, warnings=[], loaded=Loaded(),
                           policy=Policy(), control=None)


def unit_job(path, module="canny", **kw) -> UnitJob:
    unit = ControlUnit(model=path.stem, module=module, image=control_image(), processor_res=64, **kw)
    return UnitJob(unit, str(path), f"{path.stem} [00000000]")


def test_union_unit_through_the_sampling_hook(files, transformer):
    path, _ = files[1]["union"]
    ctx = flux_ctx(transformer)
    controls, maps = prepare_controls([unit_job(path, weight=0.9)], ctx, ControlNetCache(Policy()), width=W, height=H)
    assert controls.family == "flux" and controls.transformer_blocks == (LAYERS, SINGLES)
    c = controls.controls[0]
    assert c.union_mode == UNION_MODES["canny"] and len(maps) == 1
    inputs = call_inputs()
    call = UNetCall(sample=inputs["hidden_states"], timestep=inputs["timestep"],
                    context=inputs["encoder_hidden_states"],
                    extra={"pooled_projections": inputs["pooled_projections"], "guidance": inputs["guidance"],
                           "img_ids": inputs["img_ids"], "txt_ids": inputs["txt_ids"]})
    out = HookChain([ControlNetHook(controls)]).residuals(StepState(FIRST_PASS, 0, 4, W, H), call)
    assert controls.calls == 1
    hint = c.hint(W, H, "cpu", torch.float32, False)
    control = pack_latents(flux_encoder(ctx.model, "cpu")(hint * 2 - 1))
    want = flux_controlnet_residuals(c.model, control, **inputs, mode=0, weight=0.9, transformer_layers=LAYERS,
                                     transformer_single_layers=SINGLES)
    for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
        for got_t, want_t in zip(out[key], want[key]):
            torch.testing.assert_close(got_t, want_t)
    assert (run_transformer(transformer, inputs, **out) - run_transformer(transformer, inputs)).abs().max() > 1e-2
    # outside the unit's guidance range the hook adds nothing: the transformer runs as without ControlNet
    late = ControlSet([ActiveControl(index=0, model=c.model, detected_map=c.detected_map, guidance_start=0.5,
                                     union_mode=0, encode=c.encode)], family="flux",
                      transformer_blocks=(LAYERS, SINGLES))
    assert ControlNetHook(late).residuals(StepState(FIRST_PASS, 0, 4, W, H), call) is None

    with pytest.raises(UserError, match="union ControlNet, which must be told the control type"):
        prepare_controls([unit_job(path, module="lineart_standard")], flux_ctx(transformer), ControlNetCache(Policy()),
                         width=W, height=H)


def test_dev_controlnet_with_schnell_is_skipped_with_a_warning(files):
    path, _ = files[1]["instantx"]
    schnell = tiny_flux_deeper(1, 1, guidance=False, seed=7)
    ctx = flux_ctx(schnell)
    controls, _ = prepare_controls([unit_job(path)], ctx, ControlNetCache(Policy()), width=W, height=H)
    assert controls is None
    assert any("FLUX.1-dev's distilled guidance" in w and "skipped" in w for w in ctx.warnings)


def test_wrong_family_is_a_user_error_naming_both(files, transformer, tmp_path):
    path, _ = files[1]["instantx"]
    sd_ctx = flux_ctx(transformer, family="sdxl")
    with pytest.raises(UserError, match=r"is a FLUX\.1 ControlNet and the loaded checkpoint is SDXL"):
        prepare_controls([unit_job(path)], sd_ctx, ControlNetCache(Policy()), width=W, height=H)
    sd_file = tmp_path / "control_v11p_sd15_canny.pth"
    write_tiny_controlnet(sd_file, "sd1")
    with pytest.raises(UserError, match=r"is a Stable Diffusion 1\.x ControlNet and the loaded checkpoint is FLUX\.1"):
        prepare_controls([unit_job(sd_file)], flux_ctx(transformer), ControlNetCache(Policy()), width=W, height=H)
