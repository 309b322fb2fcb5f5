"""The device policy and the checkpoint cache with FLUX.1 / SD3 models (`FlowModel`), on the CPU with fake
device-memory numbers (as tests/test_devices.py): stored float8 / GGUF weights are never widened by placing or
releasing, T5 never computes in float16, sizes count stored bytes, --medvram / --lowvram offload the
transformer's blocks, T5-XXL stays on the CPU where it does not fit, the cache keys a file with its separate parts,
an SD VAE file is not applied to a 16-channel model, and a 16-channel latent decodes tiled as whole."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.engine import devices, vae_tiling
from backend.engine.devices import DevicePolicy, MiB, Plan, RESIDENT, stream_units, unet_blocks
from backend.engine.devices.parts import (cast_floating, encoder_modules, named_encoders, stored_bytes, t5_dtype)
from backend.engine.families.flow_model import FlowModel
from backend.engine.families.flux import load_flux_transformer
from backend.engine.families.quantized import QuantizedLinear, read_gguf
from backend.engine.families.text_encoders import Float8Compute, load_t5xxl
from backend.engine.loaded_model import LoadedModel
from flow_factory import (build_clip, build_t5, build_tiny_flux, flow_vae_ldm, quantize_blocks, tiny_flow_vae, tiny_flux_config,
                          write_flux_bfl, write_flux_gguf)

torch.set_num_threads(1)
CPU = torch.device("cpu")
F8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def flux_transformer(tmp_path, kind: str):
    """The tiny FLUX transformer: "gguf" (Q8_0 QuantizedLinears), "float8" (float8 QuantizedLinears from a float8
    BFL file), "plain-float8" (nn.Linears holding float8 Parameters), "dense" (float32)."""
    if kind == "gguf":
        return load_flux_transformer(read_gguf(write_flux_gguf(tmp_path / "flux-Q8_0.gguf", "Q8_0")),
                                     dtype=torch.float32, device="cpu")
    if kind == "float8":
        path = write_flux_bfl(tmp_path / "flux-fp8.safetensors", dtype=torch.float8_e4m3fn)
        return load_flux_transformer(load_file(str(path)), dtype=torch.float32, device="cpu")
    model = build_tiny_flux()
    if kind == "plain-float8":
        quantize_blocks(model, kind="float8")
    return model.requires_grad_(False)


def write_t5_file(path, dtype):
    """A tiny T5 of the tiny FLUX transformer's text width (32), every tensor stored as `dtype` (a float8 file)."""
    t5 = build_t5(d_model=tiny_flux_config()["joint_attention_dim"])
    save_file({k: v.to(dtype).contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path))
    return path


def flow_model(tmp_path, kind: str = "gguf", t5_file_dtype=torch.float8_e4m3fn) -> FlowModel:
    t5_path = write_t5_file(tmp_path / "t5xxl.safetensors", t5_file_dtype)
    t5 = load_t5xxl(load_file(str(t5_path)), torch.bfloat16, "cpu")
    return FlowModel(family="flux", variant="flux-dev", transformer=flux_transformer(tmp_path, kind),
                     vae=tiny_flow_vae(**FLUX_VAE), text_encoders={"clip_l": build_clip("clip_l"), "t5xxl": t5},
                     tokenizers={}, vae_scale_factor=FLUX_VAE["scaling_factor"],
                     vae_shift_factor=FLUX_VAE["shift_factor"], shift=1.15, guidance_embeds=True,
                     parts={"transformer": "flux", "t5xxl": t5_path.name})


def cpu_policy(mode="resident", **kw) -> DevicePolicy:
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("vae_dtype", torch.float32)
    return DevicePolicy(device=CPU, mode=mode, **kw)


def flux_inputs(seed: int = 1) -> dict:
    config = tiny_flux_config()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(4)[None, :]
    return {"hidden_states": torch.randn(1, 16, config["in_channels"], generator=gen),
            "encoder_hidden_states": torch.randn(1, 5, config["joint_attention_dim"], generator=gen),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=gen),
            "timestep": torch.tensor([0.5]), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(5, 3),
            "guidance": torch.tensor([3.5])}


@torch.no_grad()
def denoise(model: FlowModel, dtype=torch.float32) -> torch.Tensor:
    inputs = {k: (v.to(dtype) if v.is_floating_point() and k.endswith(("states", "projections")) else v)
              for k, v in flux_inputs().items()}
    return model.unet(**inputs, return_dict=False)[0].float()


@torch.no_grad()
def t5_pass(model: FlowModel) -> torch.Tensor:
    t5 = model.text_encoders["t5xxl"]
    return t5(input_ids=torch.tensor([[5, 17, 99, 1]])).last_hidden_state


def quantized_layers(module) -> list[QuantizedLinear]:
    return [m for m in module.modules() if isinstance(m, QuantizedLinear)]


def float8_params(module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dtype in F8]


def stored_state(model: FlowModel) -> dict:
    """What must never change by placing: each quantized layer's bytes, each float8 parameter (as bytes)."""
    out = {}
    for part, module in (("unet", model.unet), *model.text_encoders.items()):
        for name, m in module.named_modules():
            if isinstance(m, QuantizedLinear):
                out[f"{part}.{name}.qweight"] = m.qweight.clone()
        for name, p in module.named_parameters():
            if p.dtype in F8:
                out[f"{part}.{name}"] = p.detach().view(torch.uint8).clone()
    return out


def assert_stored_unchanged(model: FlowModel, before: dict) -> None:
    now = stored_state(model)
    assert set(now) == set(before)
    for key, value in before.items():
        assert now[key].dtype == torch.uint8 and torch.equal(now[key], value), key


# -- placing keeps the stored weights ----------------------------------------------------------------------
def test_encoders_of_a_list_and_of_a_dict():
    class SD:
        text_encoders = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 2)]

    class Flow:
        text_encoders = {"clip_l": torch.nn.Linear(1, 1), "t5xxl": torch.nn.Linear(1, 3)}

    assert encoder_modules(SD) == SD.text_encoders
    assert [n for n, _ in named_encoders(SD)] == ["te1", "te2"]
    assert encoder_modules(Flow) == list(Flow.text_encoders.values())
    assert [n for n, _ in named_encoders(Flow)] == ["clip_l", "t5xxl"]


@pytest.mark.parametrize("kind", ["gguf", "float8", "plain-float8"])
@pytest.mark.parametrize("mode", ["resident", "medvram", "lowvram"])
def test_place_and_release_never_widen_stored_weights(tmp_path, kind, mode):
    model = flow_model(tmp_path, kind)
    loaded = LoadedModel(model)
    before = stored_state(model)
    assert before  # the transformer (and the float8 T5) hold stored weights
    reference = copy.deepcopy(model.unet)
    cast_floating(reference, torch.bfloat16)
    expected = denoise(FlowModel(**{**model.__dict__, "transformer": reference}), torch.bfloat16)
    policy = cpu_policy(mode, dtype=torch.bfloat16, vae_dtype=torch.float32, text_dtype=torch.float32,
                        lowvram_budget=0, unit_bytes=8 * 1024, free_memory=lambda: 1 << 40)
    policy.place(loaded)
    assert_stored_unchanged(model, before)
    # everything else in the policy's dtypes: the transformer's dense tensors bf16, quantized scales float32
    for m in quantized_layers(model.unet):
        assert m.qweight.dtype == torch.uint8
        assert m.weight_scale is None or m.weight_scale.dtype == torch.float32
    dense = {p.dtype for p in model.unet.parameters() if p.dtype not in F8}
    assert dense == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    t5 = model.text_encoders["t5xxl"]
    assert float8_params(t5) and {p.dtype for p in t5.parameters() if p.dtype not in F8} == {torch.float32}
    hidden = t5_pass(model)  # the float8 blocks compute in the T5's dtype (their hooks were retargeted)
    assert hidden.dtype == torch.float32 and torch.isfinite(hidden).all()
    out = denoise(model, torch.bfloat16)
    assert torch.isfinite(out).all() and torch.equal(out, expected)  # the placed (streamed) model computes as it was
    policy.settle(loaded)
    assert_stored_unchanged(model, before)
    policy.release(loaded)
    assert_stored_unchanged(model, before)
    assert loaded.placed is None and loaded.place_hooks == [] and loaded.encoder_devices == {}


def test_cast_floating_leaves_float8_and_quantized_bytes():
    layer = torch.nn.Linear(4, 4)
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    q = QuantizedLinear(torch.randn(4, 4).to(torch.float8_e5m2), torch.zeros(4), scale=torch.tensor(0.5))
    net = torch.nn.Sequential(layer, q, torch.nn.LayerNorm(4))
    cast_floating(net, torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.bias.dtype == torch.bfloat16
    assert q.qweight.dtype == torch.uint8 and q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert net[2].weight.dtype == torch.bfloat16
    # a plain .to(dtype) would have widened the float8 parameter: the point of cast_floating
    assert torch.nn.Linear(2, 2).to(torch.float8_e4m3fn).to(dtype=torch.bfloat16).weight.dtype == torch.bfloat16


# -- T5 never in float16 -------------------------------------------------------------------------------------
def test_t5_never_computes_in_float16(tmp_path, monkeypatch):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    # the dtypes of a CUDA fp16 policy, placed on the CPU (only the dtype decisions matter here)
    policy = cpu_policy(dtype=torch.float16, vae_dtype=torch.float16, text_dtype=torch.float16)
    policy.place(loaded)
    t5 = model.text_encoders["t5xxl"]
    assert {p.dtype for p in t5.parameters() if p.dtype not in F8} == {torch.bfloat16}
    assert float8_params(t5)
    hooks = [h.__self__ for m in t5.modules() for h in m._forward_pre_hooks.values()
             if isinstance(getattr(h, "__self__", None), Float8Compute)]
    assert hooks and {h.dtype for h in hooks} == {torch.bfloat16}
    assert t5_pass(model).dtype == torch.bfloat16
    assert {p.dtype for p in model.text_encoders["clip_l"].parameters()} == {torch.float16}
    assert policy.encoder_dtype("t5xxl") == torch.bfloat16 and policy.encoder_dtype("clip_l") == torch.float16
    # full precision keeps float32; a CUDA device without bfloat16 gets float32, never float16
    assert t5_dtype(torch.float32, CPU) == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert t5_dtype(torch.float16, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert t5_dtype(torch.float16, cuda) == torch.float32


# -- sizes as stored --------------------------------------------------------------------------------------------
def test_model_bytes_count_stored_bytes(tmp_path):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    policy = cpu_policy(dtype=torch.bfloat16, vae_dtype=torch.float32, text_dtype=torch.float32)
    sizes = policy.model_bytes(loaded)
    quantized = quantized_layers(model.unet)
    q_bytes = sum(m.qweight.numel() for m in quantized)
    q_ids = {id(t) for m in quantized for t in (m.qweight, m.weight_scale) if t is not None}
    others = [t for t in list(model.unet.parameters()) + list(model.unet.buffers()) if id(t) not in q_ids]
    expected = q_bytes + sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in others)
    assert sizes["unet"] == expected
    dense = sum(m.in_features * m.out_features for m in quantized)
    assert q_bytes < 0.6 * dense * 2  # Q8_0: ~1.06 bytes per weight, not bf16's 2
    t5 = model.text_encoders["t5xxl"]
    f8 = sum(p.numel() for p in float8_params(t5))
    rest = sum(t.numel() for t in list(t5.parameters()) + list(t5.buffers()) if t.dtype not in F8)
    assert sizes["t5"] == f8 + 4 * rest  # float8 one byte per weight, the rest float32
    assert sizes["text"] == [stored_bytes(model.text_encoders["clip_l"], torch.float32), sizes["t5"]]
    assert sizes["vae"] == sum(p.numel() * 4 for p in model.vae.parameters()) + \
        sum(b.numel() * 4 for b in model.vae.buffers())
    assert devices.INFERENCE_RESERVE["flux"] > 0 and devices.INFERENCE_RESERVE["sd3"] > 0


def test_auto_plan_of_a_flow_model(tmp_path):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    free = {"bytes": 0}
    policy = cpu_policy("auto", free_memory=lambda: free["bytes"])
    sizes = policy.model_bytes(loaded)
    reserve = devices.INFERENCE_RESERVE["flux"]
    everything = sizes["unet"] + sizes["vae"] + sum(sizes["text"]) + reserve
    free["bytes"] = everything
    assert policy.plan_for(loaded) == RESIDENT
    # T5 is not needed beside the transformer (it runs on the CPU where it does not fit): the biggest other is
    # the VAE or CLIP-L
    free["bytes"] = sizes["unet"] + max(sizes["vae"], sizes["text"][0]) + reserve
    assert policy.plan_for(loaded) == Plan("resident", "swapped")
    free["bytes"] = reserve + sizes["unet"] // 2
    assert policy.plan_for(loaded).unet == "streamed"


# -- --medvram / --lowvram ----------------------------------------------------------------------------------------
def _hooked(module) -> bool:
    return bool(module._forward_pre_hooks)


@pytest.mark.parametrize("kind", ["gguf", "dense"])
def test_lowvram_streams_the_transformer_blocks_and_matches_resident(tmp_path, kind):
    model = flow_model(tmp_path, kind)
    expected = denoise(model)
    loaded = LoadedModel(model)
    policy = cpu_policy("lowvram", lowvram_budget=0, unit_bytes=8 * 1024, free_memory=lambda: 1 << 40)
    policy.place(loaded)
    flux = model.unet
    blocks = unet_blocks(flux)
    assert blocks == [*flux.transformer_blocks, *flux.single_transformer_blocks]
    units = stream_units(flux, policy.unit_bytes)
    assert len(units) > len(blocks)  # each block cut into its attention, feed-forward and norm layers
    inside = {id(m) for b in blocks for m in b.modules()}
    assert all(id(u) in inside and _hooked(u) for u in units)
    for small in (flux.x_embedder, flux.context_embedder, flux.time_text_embed, flux.norm_out, flux.proj_out):
        assert not any(_hooked(m) for m in small.modules())  # resident around the streamed blocks
    if kind == "gguf":  # the quantized bytes are what streams
        assert any(isinstance(m, QuantizedLinear) for u in units for m in u.modules())
    ran = []
    for u in units:
        u.register_forward_pre_hook(lambda m, _i: ran.append(id(m)))
    streamer = loaded.streamer
    out = denoise(model)
    assert torch.equal(out, expected)  # the same weights, copied in and out
    assert sorted(ran) == sorted(id(u) for u in units)  # each unit ran once, brought by the streamer
    assert streamer.transfers >= len(units) and streamer.peak_loaded_units <= 2
    policy.settle(loaded)
    assert streamer.loaded_bytes == 0


def test_medvram_swaps_the_transformer_whole_and_sd3_blocks_stream(tmp_path):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    policy = cpu_policy("medvram", free_memory=lambda: 1 << 40)
    policy.place(loaded)
    assert _hooked(model.unet) and not any(_hooked(b) for b in model.unet.transformer_blocks)
    swapped = [model.text_encoders["clip_l"], model.text_encoders["t5xxl"], model.vae.encoder, model.vae.decoder,
               model.unet]
    assert all(_hooked(m) for m in swapped) and loaded.streamer.units == len(swapped)
    assert policy.encoder_devices(loaded) == {}
    # SD3's joint blocks are its units
    from flow_factory import tiny_sd3_transformer
    sd3 = tiny_sd3_transformer()
    assert unet_blocks(sd3) == list(sd3.transformer_blocks)
    assert {id(u) for u in stream_units(sd3, 4 * 1024)} <= {id(m) for b in sd3.transformer_blocks for m in b.modules()}


@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_t5_stays_on_the_cpu_when_the_device_is_short(tmp_path, mode):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    t5 = model.text_encoders["t5xxl"]
    free = {"bytes": 1 << 40}
    policy = cpu_policy(mode, lowvram_budget=0, free_memory=lambda: free["bytes"])
    policy.place(loaded)
    assert _hooked(t5) and policy.encoder_devices(loaded) == {}  # room: swapped in for its pass, as Forge
    policy.release(loaded)
    free["bytes"] = stored_bytes(t5) + devices.policy.T5_PASS_RESERVE - 1  # a little short
    policy.place(loaded)
    assert not _hooked(t5) and policy.encoder_devices(loaded) == {"t5xxl": policy.offload_device}
    assert _hooked(model.text_encoders["clip_l"])  # the CLIP encoder is still swapped in
    assert all(p.device == policy.offload_device for p in t5.parameters())
    before = loaded.streamer.transfers
    assert torch.isfinite(t5_pass(model)).all()
    assert loaded.streamer.transfers == before  # T5 ran where it lives: nothing copied
    # resident: T5 on the device with the rest, nothing elsewhere
    cpu_policy("resident").place(loaded)
    assert policy.encoder_devices(loaded) == {}


def test_flow_conditioner_takes_the_encoder_devices(tmp_path):
    """The pipelines hand `policy.encoder_devices(loaded)` to the FlowConditioner, which runs T5 there."""
    from backend.engine.families.flow_conditioning import FlowConditioner
    model = flow_model(tmp_path, "gguf")
    model.tokenizers = {"clip_l": object(), "t5xxl": object()}
    loaded = LoadedModel(model)
    policy = cpu_policy("lowvram", lowvram_budget=0, free_memory=lambda: 0)
    policy.place(loaded)
    conditioner = FlowConditioner(model, policy.device, encoder_devices=policy.encoder_devices(loaded))
    assert conditioner._device_of("t5xxl") == policy.offload_device
    seen = []
    model.text_encoders["t5xxl"].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].device),
                                                           with_kwargs=True)
    context = conditioner._t5([5, 17, 1], [1.0, 1.0, 1.0])
    assert seen == [policy.offload_device] and context.dtype == torch.float32 and context.device == policy.device


# -- the checkpoint cache ---------------------------------------------------------------------------------------------
def test_cache_keys_a_file_with_its_parts(tmp_path):
    from backend.engine.worker import ModelCache
    transformer = tmp_path / "flux1-dev.safetensors"
    transformer.write_bytes(b"x" * 1000)
    parts = {}
    for name, size in (("ae", 300), ("clip_l", 200), ("t5_fp8", 5000), ("t5_fp16", 9000)):
        parts[name] = tmp_path / f"{name}.safetensors"
        parts[name].write_bytes(b"x" * size)
    shared = flow_model(tmp_path, "dense")
    calls = []

    def loader(path, additional, *, dtype, vae_dtype, text_dtype, device):
        calls.append((path, [p.name for p in additional], dtype, device))
        return FlowModel(**{**shared.__dict__, "parts": {p.name: p.name for p in additional}})

    cache = ModelCache(cpu_policy(), hashes=None)
    ram = {"free": 1 << 40}
    cache.available_ram = lambda: ram["free"]
    fp8 = tuple(str(parts[n]) for n in ("ae", "clip_l", "t5_fp8"))
    fp16 = tuple(str(parts[n]) for n in ("ae", "clip_l", "t5_fp16"))
    a = cache.get(transformer, 3, parts=fp8, loader=loader)
    b = cache.get(transformer, 3, parts=fp16, loader=loader)
    assert a is not b and len(cache.models) == 2 and cache.loads == 2
    assert calls[0] == (transformer, ["ae.safetensors", "clip_l.safetensors", "t5_fp8.safetensors"], torch.float32, "cpu")
    assert cache.get(transformer, 3, parts=fp8, loader=loader) is a and cache.loads == 2  # cached: no read
    assert [k[0] for k in cache.models] == [str(transformer)] * 2
    # a part file changed on disk: another entry
    parts["t5_fp8"].write_bytes(b"y" * 5001)
    assert cache.get(transformer, 3, parts=fp8, loader=loader) is not a and cache.loads == 3


def test_cache_makes_ram_for_the_file_and_its_parts(tmp_path):
    from backend.engine.worker import ModelCache
    big, small = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    big.write_bytes(b"x" * (64 * MiB))
    small.write_bytes(b"x" * 1000)
    t5 = tmp_path / "t5.safetensors"
    t5.write_bytes(b"x" * (512 * MiB // 8))
    shared = flow_model(tmp_path, "dense")
    cache = ModelCache(cpu_policy(), hashes=None)
    loader = lambda path, additional, **kw: FlowModel(**shared.__dict__)  # noqa: E731
    need_small = int(small.stat().st_size * 1.25) + cache.RAM_MARGIN
    cache.available_ram = lambda: need_small + 1  # room for the small file alone, not with the T5 beside it
    cache.get(big, 3, loader=loader)
    cache.get(small, 3, loader=loader)
    assert len(cache.models) == 2  # the small file alone fit: nothing evicted
    cache.get(small, 3, parts=(str(t5),), loader=loader)
    assert [k[0] for k in cache.models] == [str(small)] and cache.evictions == 2  # its parts' size counted too


# -- the VAE: SD VAE files, NaN upcast, tiles of 16 channels -----------------------------------------------------------
def _sd_vae_file(path):
    from diffusers import AutoencoderKL

    from flow_factory import FLOW_VAE_CONFIG
    vae = AutoencoderKL(**{**FLOW_VAE_CONFIG, "latent_channels": 4, "use_quant_conv": True,
                           "use_post_quant_conv": True})
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def test_vae_files_on_a_flow_model(tmp_path):
    from backend.engine.worker import VaeSwitcher
    model = flow_model(tmp_path, "dense")
    loaded = LoadedModel(model)
    own = {k: v.clone() for k, v in model.vae.state_dict().items()}
    switcher = VaeSwitcher()
    note = switcher.apply(loaded, str(_sd_vae_file(tmp_path / "vae-ft-mse.safetensors")))
    assert note and "vae-ft-mse.safetensors" in note and "4 latent channels" in note and "16" in note
    assert loaded.vae.path is None and all(torch.equal(v, own[k]) for k, v in model.vae.state_dict().items())
    # a 16-channel VAE file (ae.safetensors) is applied, and the model's own comes back after
    other = tiny_flow_vae(**FLUX_VAE, seed=7)
    ae = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in flow_vae_ldm(other).items()}, str(ae))
    assert switcher.apply(loaded, str(ae)) is None and loaded.vae.path == str(ae)
    assert torch.equal(model.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    assert switcher.apply(loaded, None) is None
    assert all(torch.equal(v, own[k]) for k, v in model.vae.state_dict().items())


def test_vae_upcast_after_nans_keeps_the_stored_weights(tmp_path):
    model = flow_model(tmp_path, "gguf")
    loaded = LoadedModel(model)
    before = stored_state(model)
    policy = cpu_policy(dtype=torch.bfloat16, vae_dtype=torch.bfloat16, text_dtype=torch.float32)
    policy.place(loaded)
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    policy.upcast_vae(loaded)
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert_stored_unchanged(model, before)


def _smooth_latent(channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


def test_tiled_decode_and_encode_of_16_channels(tmp_path):
    vae = tiny_flow_vae(**FLUX_VAE)
    assert vae.post_quant_conv is None and vae.quant_conv is None
    z = _smooth_latent(16, 32, 40)
    calls = []
    handle = vae.decoder.up_blocks[0].register_forward_pre_hook(lambda m, i: calls.append(1))
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0].float()
        calls.clear()
        tiled = vae_tiling.decode_tiled(vae, z, tile=192, overlap=64, downsample=8)
    handle.remove()
    assert len(calls) == 2 * 4  # 2 x 2 tiles, two passes (statistics, then output)
    assert tiled.shape == whole.shape == (1, 3, 256, 320)
    diff = (tiled - whole).abs()
    assert diff.mean() < 0.08 and diff.max() < 1.5, (float(diff.mean()), float(diff.max()))
    x = whole.clamp(-1, 1)
    with torch.no_grad():
        mean = vae.encode(x, return_dict=False)[0].mean
        tiled_mean = vae_tiling.encode_tiled(vae, x, tile=192, overlap=64, downsample=8)
    assert tiled_mean.shape == mean.shape == (1, 16, 32, 40)
    assert (tiled_mean - mean).abs().mean() < 0.1 * mean.abs().mean()
