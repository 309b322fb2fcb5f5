"""The device policy on the CPU with the tiny models: dtypes and devices from the flags, where each part
lives under each residency (checked by inspecting the weights while each part runs and by the streamer's
transfer counts), offloaded results equal resident ones, bf16 close to float32, attention choices, the
automatic plan and its out-of-memory step-down.

Offloading is exercised with the CPU as both the compute and the offload device: the streamer still
copies each unit's weights when it runs and drops the copies after, so the hooks, the order, the counts
and the results are the real ones; only the copies' speed says nothing about a GPU's.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from backend.engine import devices
from backend.checkpoints import ModelFile
from backend.core.cmd_args import parse_args
from backend.engine.devices import MiB, DevicePolicy, Plan, RESIDENT, stream_units, unet_blocks
from backend.engine.loaded_model import LoadedModel
from backend.engine.model_loader import load_sd_model
from backend.core.options import SETTINGS
from backend.core.sampler_catalog import resolve_sampling
from backend.engine.pipelines import txt2img
from backend.engine.pipelines.common import JobContext, StepClock
from backend.core.schemas import Txt2ImgRequest

torch.set_num_threads(1)
CPU = torch.device("cpu")




def options(**kw) -> dict:
    opts = {s.key: s.default for s in SETTINGS}
    opts.update(kw)
    return opts


def generate(loaded, policy, ckpt, opts=None, **req_kw) -> tuple[np.ndarray, object, JobContext]:
    body = dict(prompt="a red house", negative_prompt="blurry", steps=3, width=64, height=64, seed=5,
                sampler_name="Euler", cfg_scale=6, do_not_save_samples=True, do_not_save_grid=True)
    body.update(req_kw)
    req = Txt2ImgRequest(**body)
    opts = opts or options()
    ctx = JobContext(loaded=loaded, policy=policy, options=opts, outputs_root=ckpt.parent,
                     checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=StepClock(),
                     sampling=resolve_sampling(req, opts["default_sampler"]))
    result = txt2img.run(req, ctx)
    pixels = np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int32)
    return pixels, result, ctx


def cpu_policy(mode="resident", **kw) -> DevicePolicy:
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("vae_dtype", torch.float32)
    return DevicePolicy(device=CPU, mode=mode, **kw)


@pytest.fixture(scope="module")
def resident(tiny_models):
    policy = cpu_policy()
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    return generate(loaded, policy, tiny_models["sd1"])[0]


# -- flags -> device and dtypes -------------------------------------------------------------------
def test_use_cpu_runs_float32_here_and_bf16_only_where_supported(monkeypatch):
    args = parse_args(["--use-cpu", "all"])
    monkeypatch.setattr(devices.policy, "cpu_bf16_supported", lambda: False)
    p = DevicePolicy.from_args(args)
    assert (p.device, p.mode, p.dtype, p.vae_dtype, p.text_dtype) == (CPU, "resident", torch.float32, torch.float32, torch.float32)
    monkeypatch.setattr(devices.policy, "cpu_bf16_supported", lambda: True)
    p = DevicePolicy.from_args(args)
    assert (p.dtype, p.vae_dtype, p.text_dtype, p.channels_last) == (torch.bfloat16, torch.bfloat16, torch.float32, True)
    assert p.apply_options({"cpu_bf16": "off"}) and p.dtype == torch.float32
    for flags in (["--no-half"], ["--precision", "full"]):
        assert DevicePolicy.from_args(parse_args(["--use-cpu", "all", *flags]), options={"cpu_bf16": "on"}).dtype == torch.float32
    p = DevicePolicy.from_args(parse_args(["--use-cpu", "all", "--no-half-vae"]), options={"cpu_bf16": "on"})
    assert (p.dtype, p.vae_dtype) == (torch.bfloat16, torch.float32)


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(devices.cpu, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert devices.cpu_bf16_supported()
    monkeypatch.setattr(devices.cpu, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    assert devices.cpu_bf16_supported()
    monkeypatch.setattr(devices.cpu, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not devices.cpu_bf16_supported()


def test_gpu_flags_pick_mode_dtype_and_part_devices(monkeypatch):
    """Device and mode decisions for a CUDA machine (only the decisions: no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = DevicePolicy.from_args(parse_args([]))
    assert (p.device.type, p.mode, p.dtype, p.vae_dtype) == ("cuda", "auto", torch.float16, torch.float16)
    assert DevicePolicy.from_args(parse_args(["--medvram"])).mode == "medvram"
    assert DevicePolicy.from_args(parse_args(["--lowvram", "--medvram"])).mode == "lowvram"
    assert DevicePolicy.from_args(parse_args(["--no-half-vae"])).vae_dtype == torch.float32
    assert DevicePolicy.from_args(parse_args(["--device-id", "1"])).device == torch.device("cuda:1")
    args = parse_args(["--use-cpu", "gfpgan", "esrgan"])
    assert devices.device_for(args, "sd").type == "cuda"
    assert devices.device_for(args, "gfpgan") == CPU and devices.device_for(args, "esrgan") == CPU
    assert devices.device_for(args, "codeformer").type == "cuda"
    assert DevicePolicy.from_args(parse_args(["--use-cpu", "sd"])).device == CPU
    assert DevicePolicy.from_args(parse_args(["--use-cpu", "all"]), part="codeformer").device == CPU


def test_attention_flags_as_a1111_names_them(monkeypatch):
    monkeypatch.setattr(devices.attention, "xformers_available", lambda: False)
    pick = lambda *flags: devices.attention_from_args(parse_args(list(flags)))  # noqa: E731
    assert pick() == "sdp" and pick("--opt-sdp-attention") == "sdp"
    assert pick("--xformers") == "sdp"  # not installed here: SDPA instead
    assert pick("--opt-sdp-no-mem-attention") == "sdp-no-mem"
    assert pick("--opt-split-attention") == "split" and pick("--opt-sub-quad-attention") == "split"
    assert pick("--disable-opt-split-attention") == "basic"
    monkeypatch.setattr(devices.attention, "xformers_available", lambda: True)
    assert pick("--xformers", "--opt-sdp-attention") == "xformers"


@pytest.mark.parametrize("kind", ["sdp-no-mem", "split", "basic"])
def test_attention_processors_give_the_sdpa_result(tiny_models, resident, kind):
    policy = cpu_policy(attention=kind)
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    from diffusers.models.attention_processor import Attention
    procs = {type(m.processor).__name__ for part in (model.unet, model.vae) for m in part.modules() if isinstance(m, Attention)}
    assert procs == {type(devices.attention_processor(kind)).__name__}
    pixels = generate(loaded, policy, tiny_models["sd1"])[0]
    assert np.abs(pixels - resident).max() <= 1


# -- residency ------------------------------------------------------------------------------------
def _watch(units, masters):
    """Record, each time a unit runs, which of the watched units hold device copies (not their RAM weights)."""
    seen = []

    def loaded_units():
        return {i for i, u in enumerate(units) if any(p.data_ptr() != masters[id(p)] for p in u.parameters())}

    def pre(module, _inputs):
        seen.append((units.index(module), loaded_units()))

    for u in units:
        u.register_forward_pre_hook(pre)  # after the streamer's hook, so it sees the unit loaded
    return seen


def test_resident_puts_everything_on_the_device_in_its_dtypes(tiny_models):
    policy = cpu_policy(vae_dtype=torch.float32, dtype=torch.bfloat16, text_dtype=torch.float32)
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.float32}
    assert loaded.streamer is None and loaded.place_hooks == []


def test_medvram_keeps_one_part_on_the_device_and_matches_resident(tiny_models, resident):
    policy = cpu_policy("medvram")
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    streamer = loaded.streamer
    units = [model.text_encoders[0], model.vae.encoder, model.vae.decoder, model.vae.quant_conv,
             model.vae.post_quant_conv, model.unet]
    assert streamer.units == len(units) and len(loaded.place_hooks) == len(units)
    masters = {id(p): p.data_ptr() for u in units for p in u.parameters()}
    seen = _watch(units, masters)
    pixels, _, _ = generate(loaded, policy, tiny_models["sd1"])
    assert np.array_equal(pixels, resident)
    # every part ran on a copy, and nothing else was loaded while it ran
    assert seen and all(loaded == {i} for i, loaded in seen)
    # text encoder, UNet (once for all 3 steps), post_quant_conv, decoder
    assert streamer.transfers == 4
    policy.settle(loaded)
    assert all(p.data_ptr() == masters[id(p)] for u in units for p in u.parameters())


def test_lowvram_streams_the_unet_in_units_with_prefetch_and_matches_resident(tiny_models, resident):
    policy = cpu_policy("lowvram", lowvram_budget=0, unit_bytes=48 * 1024)
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    streamer = loaded.streamer
    units = stream_units(model.unet, policy.unit_bytes)
    assert len(units) > len(unet_blocks(model.unet))  # blocks split into resnets / attentions / samplers
    masters = {id(p): p.data_ptr() for u in units for p in u.parameters()}
    seen = _watch(units, masters)
    pixels, _, _ = generate(loaded, policy, tiny_models["sd1"])
    assert np.array_equal(pixels, resident)
    assert len(seen) == 3 * len(units)  # each unit ran once per step (cond and uncond batched)
    assert all(i in loaded and len(loaded) <= 2 for i, loaded in seen)  # itself, plus at most the prefetched next
    assert streamer.peak_loaded_units <= 2
    # from step 2 on, each unit small enough to prefetch was copied while the one before it ran
    n_small = sum(1 for u in units if devices.tensor_bytes(u) <= streamer.max_prefetch_bytes)
    assert n_small > len(units) // 2 and streamer.prefetch_hits >= 2 * n_small - 2
    small = [model.unet.conv_in, model.unet.time_embedding, model.unet.conv_out]
    assert all(not m._forward_pre_hooks for m in small)  # the small parts stay resident


def test_lowvram_budget_keeps_the_largest_units_resident(tiny_models):
    policy = cpu_policy("lowvram", unit_bytes=16 * 1024)
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    units = stream_units(model.unet, policy.unit_bytes)
    sizes = sorted((devices.tensor_bytes(u) for u in units), reverse=True)
    policy.lowvram_budget = sizes[0] + sizes[1]
    policy.place(loaded)
    hooked = [u for u in units if u._forward_pre_hooks]
    assert len(hooked) == len(units) - 2
    assert sorted(devices.tensor_bytes(u) for u in units if not u._forward_pre_hooks) == sorted(sizes[:2])


def test_weights_changed_while_on_the_device_are_kept(tiny_models):
    policy = cpu_policy("medvram")
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    enc = model.text_encoders[0]
    tokens = torch.tensor([[49406, 320, 49407]])
    enc(tokens)  # now on the "device"
    bias = [p for name, p in enc.named_parameters() if name.endswith("final_layer_norm.bias")][0]
    with torch.no_grad():
        bias.add_(1.0)  # e.g. a LoRA merged in place
    policy.settle(loaded)
    assert loaded.streamer.writebacks == 1
    before = bias.detach().clone()
    enc(tokens)
    policy.settle(loaded)
    assert torch.equal(bias.detach(), before)
    assert float(before.mean()) > 0.5  # the +1 survived the trip


def test_release_and_replace_do_not_stack_hooks(tiny_models):
    policy = cpu_policy("lowvram", lowvram_budget=0)
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy.place(loaded)
    count = sum(len(m._forward_pre_hooks) for m in model.unet.modules())
    policy.release(loaded)
    assert sum(len(m._forward_pre_hooks) for m in model.unet.modules()) == 0 and loaded.placed is None
    policy.place(loaded)
    assert sum(len(m._forward_pre_hooks) for m in model.unet.modules()) == count


def test_bf16_is_close_to_float32(tiny_models, resident):
    """bfloat16 UNet and VAE (text encoder float32), as `--use-cpu` runs on bf16 hardware: within 3/255 on average."""
    policy = DevicePolicy.from_args(parse_args(["--use-cpu", "all"]), options={"cpu_bf16": "on"})
    model = load_sd_model(tiny_models["sd1"], dtype=policy.dtype, vae_dtype=policy.vae_dtype, text_dtype=policy.text_dtype)
    loaded = LoadedModel(model)
    policy.place(loaded)
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    pixels, result, _ = generate(loaded, policy, tiny_models["sd1"])
    diff = np.abs(pixels - resident)
    assert diff.mean() < 3 and np.percentile(diff, 99) < 16, (diff.mean(), np.percentile(diff, 99))
    assert "bf16" not in result.images[0].infotext and "bfloat16" not in result.images[0].infotext


# -- the automatic plan ---------------------------------------------------------------------------
def test_auto_plan_follows_the_free_memory(tiny_models):
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    free = {"bytes": 0}
    policy = cpu_policy("auto", free_memory=lambda: free["bytes"])
    sizes = policy.model_bytes(loaded)
    reserve = devices.INFERENCE_RESERVE["sd1"]
    everything = sizes["unet"] + sizes["vae"] + sum(sizes["text"]) + reserve
    free["bytes"] = everything
    assert policy.plan_for(loaded) == RESIDENT
    free["bytes"] = everything - 1
    assert policy.plan_for(loaded) == Plan("resident", "swapped")
    free["bytes"] = reserve + sizes["unet"] // 2
    plan = policy.plan_for(loaded)
    assert plan.unet == "streamed" and plan.others == "swapped" and plan.name == "lowvram"
    assert policy.plan_for(loaded).budget < sizes["unet"]


def test_out_of_memory_steps_down_until_it_fits(tiny_models, resident, monkeypatch):
    """The worker's retry: a job that runs out of memory runs again with a smaller residency."""
    from backend.engine import worker
    model = load_sd_model(tiny_models["sd1"])
    loaded = LoadedModel(model)
    policy = cpu_policy("auto", free_memory=lambda: 1 << 40)
    policy.place(loaded)
    assert policy.mode_for(loaded) == "resident"
    plans = []

    def pipeline(payload, ctx, state):
        plans.append(policy.mode_for(loaded))
        if plans[-1] != "lowvram":  # pretend only a streamed UNet fits
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(loaded, policy, tiny_models["sd1"])[1]

    class Cache:
        loads = 1  # ModelCache counts the checkpoints it read from their files

        def get(self, path, limit, parts=()):
            return loaded

    monkeypatch.setattr(worker, "_run_txt2img", pipeline)
    monkeypatch.setattr(worker, "_prepare_scripts", lambda *a: [])
    ckpt = tiny_models["sd1"]
    state = worker.WorkerState(policy=policy, cache=Cache(), hashes=None, vae=worker.VaeSwitcher())
    payload = {"checkpoint": ModelFile(ckpt.name, ckpt, sha256="0" * 64), "options": options(), "data_dir": ckpt.parent,
               "request": None}
    result = worker.run_job("txt2img", payload, state, StepClock())
    assert plans == ["resident", "partial", "lowvram"]
    pixels = np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int32)
    assert np.array_equal(pixels, resident)
    while policy.degrade(loaded):
        pass
    assert loaded.plan == Plan("streamed", "swapped", 0)


def test_compile_wraps_the_forward_and_keeps_results():
    """--compile on the CPU (inductor): same output as eager, once per shape (a small conv net, to stay quick)."""
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU()).eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = net(x)
        eager = net.forward
        devices.compile_unet(net, CPU, eager)
        assert net.forward != eager  # the module now runs the compiled graph
        got = net(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_memory_report_has_a1111_shape():
    from backend.engine.worker import memory_report
    report = memory_report()
    assert set(report["ram"]) == {"free", "used", "total"} and report["ram"]["used"] > 0
    if torch.cuda.is_available():
        assert {"system", "active", "allocated", "reserved", "inactive", "events"} <= set(report["cuda"])
    else:
        assert report["cuda"] == {"error": "unavailable"}


# -- on a GPU (skipped without one) ---------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_cuda_offload_matches_resident_and_uses_less_memory(tiny_models, mode):
    dev = torch.device("cuda")
    results, peaks = {}, {}
    for m in ("resident", mode):
        policy = DevicePolicy(device=dev, dtype=torch.float32, vae_dtype=torch.float32, mode=m, lowvram_budget=0,
                              unit_bytes=16 * 1024)
        model = load_sd_model(tiny_models["sd1"])
        loaded = LoadedModel(model)
        policy.place(loaded)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        results[m] = generate(loaded, policy, tiny_models["sd1"])[0]
        peaks[m] = torch.cuda.max_memory_allocated()
        policy.release(loaded)
        if m != "resident":
            streamer = loaded.streamer
            assert streamer is None or streamer.current is None
    assert np.abs(results["resident"] - results[mode]).max() <= 1
    assert peaks[mode] < peaks["resident"]


def test_medvram_with_a_tiled_vae_matches_resident(tiny_models):
    """The tiled VAE calls the decoder in pieces; the policy's hooks still bring it to the device."""
    opts = options(vae_tiling="Always", vae_tile_size=128, vae_tile_overlap=32)
    images = {}
    for mode in ("resident", "medvram"):
        policy = cpu_policy(mode)
        model = load_sd_model(tiny_models["sd1"])
        loaded = LoadedModel(model)
        policy.place(loaded)
        images[mode] = generate(loaded, policy, tiny_models["sd1"], opts, width=192, height=192, steps=2)[0]
        if mode == "medvram":
            policy.settle(loaded)
            assert loaded.streamer.transfers == 4
    assert np.array_equal(images["resident"], images["medvram"])
