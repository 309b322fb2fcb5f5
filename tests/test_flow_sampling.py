"""Sampling FLUX.1 and SD3 (flow matching) in the pipelines: the flow schedule and its schedule types, the denoiser
x0 = x - sigma * v, FLUX's packing, CFG 1 vs CFG, the distilled guidance input, img2img noising on the flow, the
samplers that add noise, the 16-channel VAE with its shift, previews, infotext and its paste-back, and short
txt2img / img2img / hires. fix runs of tiny random-weight models through the pipeline functions."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from backend.checkpoints import ModelFile
from backend.core.errors import UserError
from backend.core.infotext import infotext_to_request_fields, parse_infotext
from backend.core.options import SETTINGS
from backend.core.sampler_catalog import find_sampler, resolve_sampling
from backend.core.schemas import Img2ImgRequest, Txt2ImgRequest
from backend.engine import schedules
from backend.engine.families.flow_sampling import (FlowModelCall, flow_sample_fn, flux_image_ids, in_noise_space,
                                                   pack_latents, unpack_latents)
from backend.engine.families.flow_schedule import FlowSchedule, default_shift
from backend.engine.loaded_model import LoadedModel
from backend.engine.pipelines import img2img, processing, txt2img
from backend.engine.pipelines.common import (CFGDenoiser, JobContext, StepClock, decode_latents, encode_images,
                                             noised_latents)
from backend.engine.samplers import sample_euler, sample_euler_ancestral
from flow_factory import StandInFlowConditioner, tiny_flux_model, tiny_sd3_model

torch.set_num_threads(1)
CPU = torch.device("cpu")


# -- the schedule ----------------------------------------------------------------------------------------------------
def test_flow_schedule_follows_the_shift_formula_from_t_1_over_1000_to_1():
    ms = FlowSchedule(3.0, family="sd3")
    assert ms.num_timesteps == 1000 and ms.sigmas.shape == (1000,)
    assert ms.sigma_max == 1.0
    assert math.isclose(ms.sigma_min, 3 * 0.001 / (1 + 2 * 0.001), rel_tol=1e-12)
    assert math.isclose(float(ms.sigma_at(0.5)), 0.75)  # 3 * .5 / (1 + 2 * .5)
    assert bool((ms.sigmas[1:] > ms.sigmas[:-1]).all())
    t = torch.tensor([0.0, 10.5, 499.0, 999.0], dtype=torch.float64)
    assert torch.allclose(ms.sigma_to_t(ms.t_to_sigma(t)), t)
    assert math.isclose(float(ms.t_to_sigma(torch.tensor(499.0, dtype=torch.float64))), 0.75)
    # shift 1: sigma = t
    assert torch.allclose(FlowSchedule(1.0).sigmas.double(), torch.arange(1, 1001, dtype=torch.float64) / 1000)
    assert ms.model_timestep(torch.tensor([0.5])).item() == 500.0  # SD3: sigma * 1000
    assert FlowSchedule(2.0, family="flux").model_timestep(torch.tensor([0.5])).item() == 0.5  # FLUX scales inside


def test_default_shifts_are_forges():
    assert math.isclose(default_shift("flux-dev"), math.exp(1.15))
    assert math.isclose(default_shift("flux-schnell"), math.exp(1.0))
    assert default_shift("sd3.5-large") == 3.0 and default_shift("sd3-medium") == 3.0


def test_model_schedule_gives_a_flow_model_its_flow_schedule():
    ms = schedules.model_schedule(tiny_sd3_model())
    assert isinstance(ms, FlowSchedule) and ms.shift == 3.0 and ms.family == "sd3"


@pytest.mark.parametrize("schedule", ["Automatic", "Simple", "Beta", "Uniform", "SGM Uniform", "Normal", "Karras",
                                      "Exponential", "KL Optimal", "DDIM", "Polyexponential"])
def test_every_schedule_type_but_ays_descends_within_the_flow_and_ends_at_zero(schedule):
    ms = FlowSchedule(math.exp(1.15), family="flux")
    sig = schedules.get_sigmas(schedule, 8, ms, "Euler")
    assert sig.shape == (9,) and sig[-1] == 0
    assert bool((sig[:-1] > sig[1:]).all())
    top = 0.9 if schedule == "DDIM" else 0.99  # DDIM's grid starts at timestep 1 + (n - 1) * (1000 // n), as for SD
    assert top <= float(sig[0]) <= 1.0 and float(sig[-2]) >= ms.sigma_min * 0.999


def test_simple_is_forges_table_walk_and_beta_is_dense_at_both_ends():
    ms = FlowSchedule(3.0, family="sd3")
    simple = schedules.get_sigmas("Simple", 4, ms)
    expected = [float(ms.sigmas[999 - int(i * 250)]) for i in range(4)] + [0.0]
    assert np.allclose(simple.numpy(), expected, atol=1e-6)
    assert math.isclose(float(simple[0]), 1.0)
    beta = schedules.get_sigmas("Beta", 10, ms)
    t = ms.sigma_to_t(beta[:-1].double())
    gaps = (t[:-1] - t[1:]).numpy()
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]  # Beta(0.6, 0.6) quantiles: dense at both ends


def test_align_your_steps_is_refused_for_flow_models():
    with pytest.raises(UserError, match="Align Your Steps.*FLUX and SD3"):
        schedules.get_sigmas("Align Your Steps", 10, FlowSchedule(3.0, "sd3"))


# -- packing ---------------------------------------------------------------------------------------------------------
def test_flux_packing_round_trips_and_matches_diffusers_pipeline():
    from diffusers import FluxPipeline
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    ids = flux_image_ids(6, 10)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, CPU, torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 2.0]  # token 7: row 1, column 2


# -- the denoiser ----------------------------------------------------------------------------------------------------
class _Velocity(torch.nn.Module):
    """A stand-in SD3 transformer: v = 2 * x + 1, whatever the text; records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False, **kw):
        self.calls.append({"batch": hidden_states.shape[0], "timestep": timestep.clone(), **kw})
        return (2 * hidden_states + 1,)


def _conds(model, prompts, steps=4, negative=False):
    return StandInFlowConditioner(model, CPU).schedules(prompts, steps, negative)


def _denoiser(model, cfg, **kw):
    cond = StandInFlowConditioner(model, CPU)
    ms = schedules.model_schedule(model)
    return CFGDenoiser(model, ms, cond.schedules(["a cat"], 4, False), cond.schedules(["ugly"], 4, True), cfg, cond,
                       CPU, torch.float32, 64, 64, **kw)


def test_denoised_is_x_minus_sigma_times_velocity_with_sd3_timestep_sigma_times_1000():
    model = tiny_sd3_model()
    model.transformer = _Velocity()
    den = _denoiser(model, 1.0)
    den.start_pass(4)
    x, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.6])
    out = den(x, sigma)
    assert torch.allclose(out, x - 0.6 * (2 * x + 1), atol=1e-6)
    assert math.isclose(model.transformer.calls[0]["timestep"].item(), 600.0, rel_tol=1e-6)


def test_odd_latent_sizes_are_padded_for_the_patches_and_cropped_back():
    model = tiny_sd3_model()
    model.transformer = _Velocity()
    den = _denoiser(model, 1.0)
    den.start_pass(4)
    x = torch.randn(1, 16, 7, 9)
    assert torch.allclose(den(x, torch.tensor([0.5])), x - 0.5 * (2 * x + 1), atol=1e-6)


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


@pytest.mark.parametrize("cfg, rows", [(1.0, 1), (7.0, 2)])
def test_cfg_1_calls_the_transformer_once_per_step_and_cfg_7_once_with_both_prompts(cfg, rows):
    model = tiny_flux_model()
    calls = _count_calls(model.transformer)
    den = _denoiser(model, cfg)
    ms = schedules.model_schedule(model)
    sigmas = schedules.get_sigmas("Simple", 3, ms)
    den.start_pass(3)
    sample_euler(den, torch.randn(1, 16, 8, 8), sigmas)
    assert len(calls) == 3
    assert all(c["hidden_states"].shape == (rows, 16, 64) for c in calls)  # 8x8 latent -> 16 tokens of 64


def test_the_distilled_cfg_scale_reaches_flux_dev_and_schnell_gets_none():
    dev = tiny_flux_model(guidance_embeds=True)
    calls = _count_calls(dev.transformer)
    den = _denoiser(dev, 1.0, distilled_cfg_scale=2.25)
    den.start_pass(1)
    den(torch.randn(1, 16, 4, 4), torch.tensor([0.8]))
    assert calls[0]["guidance"].tolist() == [2.25]
    assert math.isclose(calls[0]["timestep"].item(), 0.8, rel_tol=1e-6)  # FLUX: sigma (x1000 inside)
    schnell = tiny_flux_model(guidance_embeds=False)
    calls = _count_calls(schnell.transformer)
    den = _denoiser(schnell, 1.0, distilled_cfg_scale=2.25)
    den.start_pass(1)
    den(torch.randn(1, 16, 4, 4), torch.tensor([0.8]))
    assert calls[0].get("guidance") is None


def test_flux_denoiser_unpacks_the_transformers_velocity():
    model = tiny_flux_model()
    x, sigma = torch.randn(1, 16, 4, 6), torch.tensor([0.7])
    den = _denoiser(model, 1.0)
    den.start_pass(1)
    out = den(x, sigma)
    cond = den.conds.at(0)[0]
    with torch.no_grad():
        v = model.transformer(hidden_states=pack_latents(x), encoder_hidden_states=cond.crossattn[None],
                              pooled_projections=cond.pooled[None], timestep=sigma, img_ids=flux_image_ids(4, 6),
                              txt_ids=torch.zeros(cond.crossattn.shape[0], 3), guidance=torch.tensor([3.5]),
                              return_dict=False)[0]
    assert torch.allclose(out, x - 0.7 * unpack_latents(v, 4, 6), atol=1e-5)


def test_sd3_skip_layer_guidance_pushes_away_from_the_prediction_without_the_layers():
    from backend.engine.families.flow_sampling import SkipLayerGuidance
    model = tiny_sd3_model()
    calls = _count_calls(model.transformer)
    x, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    plain = _denoiser(model, 4.0)
    plain.start_pass(10)
    base = plain(x, sigma)
    slg = _denoiser(model, 4.0, skip_layer_guidance=SkipLayerGuidance(scale=2.0, layers=(1,), start=0.0, end=0.5))
    slg.start_pass(10)
    calls.clear()
    pushed = slg(x, sigma)
    assert len(calls) == 2 and calls[1]["skip_layers"] == [1] and calls[1]["hidden_states"].shape[0] == 1
    # after CFG, as SAI's pipeline: guided + (cond - cond without the layers) * scale
    cond_only = _denoiser(model, 1.0)
    cond_only.start_pass(10)
    d_cond = cond_only(x, sigma)
    with torch.no_grad():
        v_skip = model.transformer(hidden_states=x, encoder_hidden_states=slg.conds.at(0)[0].crossattn[None],
                                   pooled_projections=slg.conds.at(0)[0].pooled[None], timestep=sigma * 1000,
                                   skip_layers=[1], return_dict=False)[0]
    assert torch.allclose(pushed, base + (d_cond - (x - 0.5 * v_skip)) * 2.0, atol=1e-5)
    slg._step = 8  # past `end`: no extra call, the plain result
    calls.clear()
    assert torch.allclose(slg(x, sigma), base) and len(calls) == 1


# -- noising and the samplers that add noise -------------------------------------------------------------------------
def test_img2img_noising_is_the_flows_interpolation():
    latents, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    assert torch.allclose(noised_latents(tiny_sd3_model(), latents, noise, 0.3), 0.7 * latents + 0.3 * noise)
    sd_like = type("SD", (), {"prediction_type": "epsilon"})()
    assert torch.allclose(noised_latents(sd_like, latents, noise, 0.3), latents + 0.3 * noise)


def _exact(x0):
    """A denoiser that knows the answer: every call predicts `x0`."""
    return lambda x, sigma: x0.expand_as(x)


def test_noise_adding_samplers_run_through_the_change_of_variables_and_land_on_x0():
    x0 = torch.randn(1, 4, 3, 3)
    sigmas = schedules.get_sigmas("Simple", 6, FlowSchedule(3.0, "sd3"))
    seen = []

    def model(x, sigma):
        seen.append(float(sigma[0]))
        return x0.expand_as(x)

    out = in_noise_space(sample_euler_ancestral)(model, torch.randn(1, 4, 3, 3), sigmas,
                                                 noise_sampler=lambda s, sn: torch.randn(1, 4, 3, 3))
    assert torch.allclose(out, x0, atol=1e-5)
    assert all(0 < s < 1 for s in seen)  # the model is called with flow sigmas
    # Euler is the same whichever way it runs (first-order steps are invariant under the change of variables)
    den = lambda x, s: 0.5 * x  # noqa: E731
    x = torch.randn(1, 4, 3, 3)
    sig = schedules.get_sigmas("Simple", 5, FlowSchedule(3.0, "sd3"))[1:]  # below the top
    assert torch.allclose(in_noise_space(sample_euler)(den, x, sig), sample_euler(den, x, sig), atol=1e-5)


def test_which_samplers_run_in_noise_space():
    euler, euler_a, ddim = find_sampler("Euler"), find_sampler("Euler a"), find_sampler("DDIM")
    assert flow_sample_fn(euler, {"eta": 1.0}) is euler.sample_fn
    assert flow_sample_fn(euler, {"eta": 1.0, "s_churn": 0.5}) is not euler.sample_fn
    assert flow_sample_fn(euler_a, {"eta": 1.0}) is not euler_a.sample_fn
    assert flow_sample_fn(euler_a, {"eta": 0.0}) is euler_a.sample_fn
    assert flow_sample_fn(ddim, {"eta": 0.0}) is ddim.sample_fn
    assert flow_sample_fn(find_sampler("LCM"), {"eta": 0.0}) is not find_sampler("LCM").sample_fn


# -- the VAE and the previews ----------------------------------------------------------------------------------------
def _ctx(model, req=None, opts=None, tmp=None):
    from backend.engine.devices import DevicePolicy
    options = {s.key: s.default for s in SETTINGS}
    options.update(opts or {})
    path = (tmp or __import__("pathlib").Path(".")) / "tiny-flow.safetensors"
    return JobContext(loaded=LoadedModel(model), policy=DevicePolicy(device=CPU, dtype=torch.float32,
                                                                     vae_dtype=torch.float32),
                      options=options, outputs_root=path.parent, checkpoint=ModelFile(path.name, path, sha256="0" * 64),
                      vae=None, control=StepClock(),
                      sampling=resolve_sampling(req, options["default_sampler"]) if req is not None else None)


def test_16_channel_vae_decodes_with_scale_and_shift_and_encodes_back_the_same_way():
    model = tiny_flux_model()
    ctx = _ctx(model)
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        expected = model.vae.decode(z / 0.3611 + 0.1159, return_dict=False)[0]
    arr = ((expected[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(decode_latents(ctx, z)[0]), arr)
    img = Image.fromarray(arr)
    with torch.no_grad():
        mean = model.vae.encode(torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None],
                                return_dict=False)[0].mean
    assert torch.allclose(encode_images(ctx, [img]), (mean - 0.1159) * 0.3611, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cheap_previews_of_16_channel_latents(family):
    from backend.engine.previews import CHEAP_RGB, make_preview
    assert len(CHEAP_RGB[family]) == 16
    latent = torch.zeros(1, 16, 4, 4)
    latent[0, 0] = 1.0
    for method in ("Approx cheap", "Approx NN", "TAESD"):
        img = make_preview(method, family, latent, 32, 32, None, None)
        assert img.size == (32, 32)
    pixel = np.asarray(make_preview("Approx cheap", family, latent, 4, 4, None, None))[0, 0]
    assert len(set(pixel.tolist())) > 1  # channel 0's colour, not grey


# -- the pipelines ---------------------------------------------------------------------------------------------------
@pytest.fixture
def stand_in_conditioner(monkeypatch):
    monkeypatch.setattr(processing.Generation, "_conditioner",
                        lambda self, model: StandInFlowConditioner(model, self.device))


def _run_txt2img(model, tmp_path, **kw):
    body = dict(prompt="a red house", negative_prompt="blurry", steps=3, width=64, height=64, seed=5,
                sampler_name="Euler", scheduler="Simple", cfg_scale=1, do_not_save_samples=True, do_not_save_grid=True)
    body.update(kw)
    req = Txt2ImgRequest(**body)
    ctx = _ctx(model, req, tmp=tmp_path)
    return txt2img.run(req, ctx), ctx


def _pixels(result, k=0):
    return np.asarray(Image.open(io.BytesIO(result.images[k].png)).convert("RGB"))


def test_flux_txt2img_writes_forges_infotext_and_pastes_back(tmp_path, stand_in_conditioner):
    model = tiny_flux_model()
    calls = _count_calls(model.transformer)
    result, _ = _run_txt2img(model, tmp_path, distilled_cfg_scale=2.5)
    assert _pixels(result).shape == (64, 64, 3) and _pixels(result).std() > 0
    assert len(calls) == 3 and all(c["guidance"].tolist() == [2.5] for c in calls)
    text = result.images[0].infotext
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 5" in text
    assert infotext_to_request_fields(parse_infotext(text))["distilled_cfg_scale"] == 2.5
    again, _ = _run_txt2img(tiny_flux_model(), tmp_path, distilled_cfg_scale=2.5)
    assert np.array_equal(_pixels(again), _pixels(result))  # seeded: the same picture
    other, _ = _run_txt2img(tiny_flux_model(), tmp_path, distilled_cfg_scale=5)
    assert not np.array_equal(_pixels(other), _pixels(result))  # the guidance changes the picture


def test_sd3_txt2img_with_cfg_and_a_noise_adding_sampler_has_no_distilled_entry(tmp_path, stand_in_conditioner):
    model = tiny_sd3_model()
    calls = _count_calls(model.transformer)
    result, _ = _run_txt2img(model, tmp_path, sampler_name="Euler a", scheduler="Automatic", cfg_scale=5)
    assert len(calls) == 3 and all(c["hidden_states"].shape[0] == 2 for c in calls)
    assert all(0 < c["timestep"][0].item() <= 1000 for c in calls)
    assert "Distilled CFG Scale" not in result.images[0].infotext
    assert np.isfinite(_pixels(result)).all() and _pixels(result).std() > 0
    dpm, _ = _run_txt2img(tiny_sd3_model(), tmp_path, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=5)
    assert _pixels(dpm).shape == (64, 64, 3)


def test_flux_hires_fix_samples_the_second_pass_at_the_upscaled_size(tmp_path, stand_in_conditioner):
    model = tiny_flux_model()
    calls = _count_calls(model.transformer)
    result, _ = _run_txt2img(model, tmp_path, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                             denoising_strength=0.5, hr_second_pass_steps=2)
    assert _pixels(result).shape == (128, 128, 3)
    sizes = [c["hidden_states"].shape[1] for c in calls]
    assert sizes[:3] == [16] * 3 and sizes[3:] and set(sizes[3:]) == {64}  # 8x8 then 16x16 latents, packed
    hires_sigmas = [c["timestep"].item() for c in calls[3:]]
    assert hires_sigmas[0] < 0.95  # started part-way (denoising strength 0.5), not from pure noise


def test_flux_img2img_starts_from_the_noised_image(tmp_path, stand_in_conditioner, monkeypatch):
    model = tiny_flux_model()
    seen = {}
    real = img2img.noised_latents

    def spy(m, latents, noise, sigma):
        seen.update(latents=latents.clone(), noise=noise.clone(), sigma=float(sigma))
        out = real(m, latents, noise, sigma)
        seen["x"] = out.clone()
        return out

    monkeypatch.setattr(img2img, "noised_latents", spy)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    req = Img2ImgRequest(prompt="a red house", steps=4, width=64, height=64, seed=3, sampler_name="Euler",
                         scheduler="Simple", cfg_scale=1, denoising_strength=0.5, do_not_save_samples=True,
                         do_not_save_grid=True)
    ctx = _ctx(model, req, tmp=tmp_path)
    result = img2img.run(req, ctx, [init], None)
    assert _pixels(result).shape == (64, 64, 3)
    s = seen["sigma"]
    assert 0 < s < 1
    assert seen["latents"].shape == (1, 16, 8, 8)
    assert torch.allclose(seen["x"], (1 - s) * seen["latents"] + s * seen["noise"], atol=1e-6)
    assert "Distilled CFG Scale: 3.5" in result.images[0].infotext


def test_token_merging_is_skipped_on_flow_models_with_a_warning(tmp_path, stand_in_conditioner):
    model = tiny_flux_model()
    body = dict(prompt="a", steps=2, width=64, height=64, seed=1, sampler_name="Euler", cfg_scale=1,
                do_not_save_samples=True, do_not_save_grid=True)
    req = Txt2ImgRequest(**body)
    ctx = _ctx(model, req, opts={"token_merging_ratio": 0.5}, tmp=tmp_path)
    result = txt2img.run(req, ctx)
    assert any("Token merging" in w for w in result.warnings)


def test_a_refiner_of_another_latent_space_is_refused():
    from backend.engine.pipelines.refiner import check_same_latents
    sd_like = type("SD", (), {"prediction_type": "epsilon", "latent_channels": 4, "family": "sd1"})()
    with pytest.raises(UserError, match="FLUX.1 model"):
        check_same_latents(sd_like, tiny_flux_model(), "The refiner x")
    with pytest.raises(UserError):
        check_same_latents(tiny_flux_model(), tiny_sd3_model(), "The refiner x")
    check_same_latents(tiny_flux_model(), tiny_flux_model(guidance_embeds=False), "The refiner x")


def test_request_default_and_range_of_the_distilled_cfg_scale():
    from backend.core import request_checks
    assert Txt2ImgRequest().distilled_cfg_scale == 3.5 and Img2ImgRequest().distilled_cfg_scale == 3.5
    with pytest.raises(UserError, match="distilled_cfg_scale"):
        request_checks.check_txt2img(Txt2ImgRequest(distilled_cfg_scale=-1))


def test_sd3_skip_layer_guidance_from_the_settings_runs_and_names_itself_in_the_infotext(tmp_path, stand_in_conditioner):
    model = tiny_sd3_model()
    calls = _count_calls(model.transformer)
    body = dict(prompt="a", steps=4, width=64, height=64, seed=1, sampler_name="Euler", scheduler="Simple", cfg_scale=4,
                do_not_save_samples=True, do_not_save_grid=True)
    req = Txt2ImgRequest(**body)
    opts = {"sd3_slg_scale": 2.5, "sd3_slg_layers": "1", "sd3_slg_start": 0.0, "sd3_slg_end": 0.3}
    result = txt2img.run(req, _ctx(model, req, opts=opts, tmp=tmp_path))
    # steps 0 and 1 (fractions 0, .25) get the extra pass without block 1; steps 2 and 3 do not
    assert [c.get("skip_layers") for c in calls] == [None, [1], None, [1], None, None]
    text = result.images[0].infotext
    assert 'SLG scale: 2.5, SLG layers: 1, SLG start: 0, SLG end: 0.3' in text
    fields = infotext_to_request_fields(parse_infotext(text))
    assert fields["override_settings"]["sd3_slg_scale"] == 2.5 and fields["override_settings"]["sd3_slg_layers"] == "1"
    with pytest.raises(UserError, match="blocks 0 to 1"):
        txt2img.run(req, _ctx(tiny_sd3_model(), req, opts={**opts, "sd3_slg_layers": "7, 8"}, tmp=tmp_path))
    with pytest.raises(UserError, match="numbers"):
        txt2img.run(req, _ctx(tiny_sd3_model(), req, opts={**opts, "sd3_slg_layers": "seven"}, tmp=tmp_path))
    flux = tiny_flux_model()
    plain = txt2img.run(req, _ctx(flux, req, opts=opts, tmp=tmp_path))  # FLUX: no SLG, nothing written
    assert "SLG" not in plain.images[0].infotext


@pytest.mark.parametrize("sampler", [s.name for s in __import__("backend.core.sampler_catalog",
                                                                    fromlist=["SAMPLERS"]).SAMPLERS])
def test_every_sampler_samples_a_flow_model_to_a_finite_picture(sampler, tmp_path, stand_in_conditioner):
    model = tiny_sd3_model()
    result, _ = _run_txt2img(model, tmp_path, sampler_name=sampler, scheduler="Automatic", steps=4, cfg_scale=3)
    pixels = _pixels(result)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


def test_noise_adding_samplers_keep_the_flows_noise_level():
    """Euler a on the flow with a denoiser that predicts 0: x stays pure noise scaled by sigma, so at each step its
    spread is sigma_next (what (1 - sigma) * 0 + sigma * noise has), not the spread x0 + sigma * noise would give."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64, 64)
    sigmas = torch.tensor([0.9, 0.6, 0.3, 0.0])
    spreads = []
    run = in_noise_space(sample_euler_ancestral)
    run(lambda x_, s: torch.zeros_like(x_), x * 0.9, sigmas,
        noise_sampler=lambda s, sn: torch.randn(1, 4, 64, 64),
        callback=lambda d: spreads.append((float(d["x"].std()), d["i"])))
    assert abs(spreads[0][0] - 0.6) < 0.03 and abs(spreads[1][0] - 0.3) < 0.03


def test_tiled_vae_decodes_and_encodes_16_channel_latents_close_to_whole(tmp_path):
    model = tiny_flux_model()
    z = torch.randn(1, 16, 32, 32) * 0.5
    whole = np.asarray(decode_latents(_ctx(model, tmp=tmp_path), z)[0]).astype(np.int16)
    tiled_ctx = _ctx(model, opts={"vae_tiling": "Always", "vae_tile_size": 128, "vae_tile_overlap": 32}, tmp=tmp_path)
    tiled = np.asarray(decode_latents(tiled_ctx, z)[0]).astype(np.int16)
    assert tiled.shape == whole.shape == (256, 256, 3)
    assert np.abs(tiled - whole).mean() < 3  # the same picture, up to the tiles' seams
    latents = encode_images(tiled_ctx, [Image.fromarray(whole.astype(np.uint8))])
    assert latents.shape == (1, 16, 32, 32)
    plain = encode_images(_ctx(model, tmp=tmp_path), [Image.fromarray(whole.astype(np.uint8))])
    assert (latents - plain).abs().mean() < 0.1 * plain.abs().mean()
