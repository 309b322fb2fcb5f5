"""FLUX.1 transformers from the files people share: BFL layout (alone, with all-in-one prefixes, diffusers
names), float8, GGUF (city96's layout, Q8_0 / Q4_0 / Q5_1 / K-quants), and bitsandbytes NF4 (Forge's bnb-nf4). Each loaded model is compared numerically with a diffusers FluxTransformer2DModel built directly
from the same weights."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from backend.core.errors import UserError
from backend.engine.families.flux import flux_config, flux_variant, is_flux, load_flux_transformer, rope_axes
from backend.engine.families.quantized import (GGUFWeight, NF4Weight, QuantizedLinear, cat_rows, is_nf4,
                                               quantize_linears, read_gguf, read_nf4_weights, split_rows,
                                               stored_weight_bytes)
from flow_factory import (build_tiny_flux, diffusers_to_bfl, gguf_dequantized, random_kquant_rows, scaled_fp8_bfl,
                          tiny_flux_bfl, tiny_flux_config, write_flux_bfl, write_flux_gguf, write_flux_nf4)

T = gguf.GGMLQuantizationType


def flux_inputs(config: dict, seed: int = 1) -> dict:
    """One forward's inputs: a 4x4-patch image (16 tokens), 5 text tokens, timestep 0.5, guidance 3.5."""
    gen = torch.Generator().manual_seed(seed)
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    kwargs = {
        "hidden_states": torch.randn(1, h * w, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(1, 5, config["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor([0.5]),  # exact in bfloat16 (diffusers casts it to the model dtype)
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(5, 3),
    }
    if config["guidance_embeds"]:
        kwargs["guidance"] = torch.tensor([3.5])
    return kwargs


@torch.no_grad()
def run(model, inputs: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cast = {k: (v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v)
            for k, v in inputs.items()}
    return model(**cast, return_dict=False)[0].float()


def reference_from_bfl(bfl: dict[str, torch.Tensor], guidance: bool = True) -> FluxTransformer2DModel:
    """A diffusers model (float32) holding the values of a BFL state dict, placed element by element through the
    factory's own diffusers -> BFL mapping (traced with element ids) -- independent of Easel's renaming."""
    config = tiny_flux_config(guidance)
    model = FluxTransformer2DModel(**config).eval()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ids, offset = {}, 0
    for k, shape in shapes.items():
        n = shapes[k].numel()
        ids[k] = torch.arange(offset, offset + n, dtype=torch.float64).reshape(shape)
        offset += n
    flat = torch.full((offset,), float("nan"))
    for name, where in diffusers_to_bfl(ids, config).items():
        flat[where.long().reshape(-1)] = bfl[name].float().reshape(-1)
    assert not flat.isnan().any()
    model.load_state_dict({k: flat[ids[k].long()] for k in shapes}, strict=True)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]


# -- detection and config ---------------------------------------------------------------------------
def test_detection_and_config_from_shapes():
    bfl = tiny_flux_bfl(guidance=True)
    assert is_flux(bfl.keys())
    assert is_flux(["model.diffusion_model." + k for k in bfl] + ["vae.decoder.conv_in.weight"])
    assert is_flux(build_tiny_flux().state_dict().keys())  # diffusers' names
    assert not is_flux(["model.diffusion_model.input_blocks.0.0.weight", "joint_blocks.0.x_block.attn.qkv.weight"])
    assert flux_config(bfl) == tiny_flux_config(True)
    assert flux_variant(flux_config(bfl)) == "flux-dev"
    schnell = tiny_flux_bfl(guidance=False)
    assert flux_config({"model.diffusion_model." + k: v for k, v in schnell.items()}) == tiny_flux_config(False)
    assert flux_variant(flux_config(schnell)) == "flux-schnell"
    assert flux_config(build_tiny_flux(guidance=False).state_dict()) == tiny_flux_config(False)
    assert rope_axes(128) == (16, 56, 56)  # FLUX.1's own split
    assert rope_axes(32) == (4, 14, 14) and sum(rope_axes(48)) == 48 and all(a % 2 == 0 for a in rope_axes(48))


# -- plain files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,prefix", [(True, ""), (True, "model.diffusion_model."), (False, "diffusion_model.")])
def test_bfl_file_gives_the_diffusers_model(tmp_path, guidance, prefix):
    path = write_flux_bfl(tmp_path / "flux.safetensors", guidance=guidance, dtype=torch.float32, prefix=prefix)
    sd = load_file(str(path))
    if prefix:  # an all-in-one file: other parts beside the transformer are ignored
        sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    model = load_flux_transformer(sd, dtype=torch.float32, device="cpu")
    assert isinstance(model, FluxTransformer2DModel) and model.config.guidance_embeds == guidance
    assert not any(p.is_meta for p in model.parameters())
    reference = build_tiny_flux(guidance)
    inputs = flux_inputs(tiny_flux_config(guidance))
    expected = run(reference, inputs)
    assert expected.abs().mean() > 0.05  # a non-degenerate output
    torch.testing.assert_close(run(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_bf16_file_in_bf16_and_diffusers_layout(tmp_path):
    path = write_flux_bfl(tmp_path / "flux-bf16.safetensors", dtype=torch.bfloat16)
    model = load_flux_transformer(load_file(str(path)), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = flux_inputs(tiny_flux_config())
    expected = run(reference_from_bfl(load_file(str(path))).to(torch.bfloat16), inputs, torch.bfloat16)
    torch.testing.assert_close(run(model, inputs, torch.bfloat16), expected, rtol=0, atol=0)  # the same bf16 ops
    diffusers_named = {"transformer." + k: v for k, v in build_tiny_flux().state_dict().items()}
    model = load_flux_transformer(diffusers_named, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(run(model, inputs), run(build_tiny_flux(), inputs), rtol=1e-5, atol=1e-5)


def test_damaged_files_give_user_errors():
    bfl = tiny_flux_bfl()
    broken = dict(bfl)
    del broken["double_blocks.0.txt_attn.proj.weight"]
    with pytest.raises(UserError, match="txt_attn.proj.weight"):
        load_flux_transformer(broken, dtype=torch.float32, device="cpu")
    extra = dict(bfl, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="img_attn.extra.weight"):
        load_flux_transformer(extra, dtype=torch.float32, device="cpu")
    gap = dict(bfl, **{k.replace("single_blocks.0.", "single_blocks.2."): v for k, v in bfl.items()
                       if k.startswith("single_blocks.0.")})
    with pytest.raises(UserError, match="single_blocks.1"):
        flux_config(gap)
    short = dict(bfl, **{"single_blocks.0.linear1.weight": bfl["single_blocks.0.linear1.weight"][:-4]})
    with pytest.raises(UserError, match="rows"):
        load_flux_transformer(short, dtype=torch.float32, device="cpu")
    chroma = {k: v for k, v in bfl.items() if not k.startswith(("vector_in.", "guidance_in.", "double_blocks.0.img_mod"))}
    chroma["distilled_guidance_layer.in_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(UserError, match="Chroma"):
        load_flux_transformer(chroma, dtype=torch.float32, device="cpu")
    with pytest.raises(UserError, match="FLUX"):
        load_flux_transformer({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                              dtype=torch.float32, device="cpu")


# -- float8 -----------------------------------------------------------------------------------------
def test_float8_file_stays_one_byte_per_weight(tmp_path):
    path = write_flux_bfl(tmp_path / "flux-fp8.safetensors", dtype=torch.float8_e4m3fn)
    stored = load_file(str(path))
    assert {v.dtype for v in stored.values()} == {torch.float8_e4m3fn}
    model = load_flux_transformer(dict(stored), dtype=torch.float32, device="cpu")
    reference = build_tiny_flux()
    names = linear_names(model)
    assert names == linear_names(reference)
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in names)  # every linear stays float8
    linear_params = sum(reference.get_submodule(n).weight.numel() for n in names)
    qweights = [model.get_submodule(n).qweight for n in names]
    assert {q.dtype for q in qweights} == {torch.uint8}
    assert sum(q.numel() * q.element_size() for q in qweights) == linear_params  # 1 byte per weight
    # norms and biases are computed in the requested dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    inputs = flux_inputs(tiny_flux_config())
    exact = run(reference_from_bfl(stored), inputs)  # the same float8 values, upcast
    out = run(model, inputs)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    error = relative_error(out, run(reference, inputs))
    assert 0 < error < 0.15, error  # float8 e4m3 rounding (3 mantissa bits) through two blocks
    # moving to another dtype does not widen the stored weights; compute follows
    model.to(torch.bfloat16)
    assert model.get_submodule(names[0]).qweight.dtype == torch.uint8
    assert stored_weight_bytes(model) < stored_weight_bytes(reference) / 3.5
    in_bf16 = run(reference_from_bfl(stored).to(torch.bfloat16), inputs, torch.bfloat16)
    torch.testing.assert_close(run(model, inputs, torch.bfloat16), in_bf16, rtol=0, atol=0)


def test_scaled_float8_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "flux1-dev-fp8-scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in scaled_fp8_bfl().items()}, str(path))
    stored = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(path)).items()}
    model = load_flux_transformer(load_file(str(path)), dtype=torch.float32, device="cpu")
    to_k = model.get_submodule("transformer_blocks.0.attn.to_k")
    assert isinstance(to_k, QuantizedLinear) and to_k.qtype == "float8_e4m3fn" and to_k.weight_scale is not None
    values = {k: (v.float() * stored[k[: -len(".weight")] + ".scale_weight"] if v.dtype == torch.float8_e4m3fn
                  else v.float()) for k, v in stored.items() if not k.endswith(("scale_weight", "scale_input"))
              and k != "scaled_fp8"}
    inputs = flux_inputs(tiny_flux_config())
    out = run(model, inputs)
    torch.testing.assert_close(out, run(reference_from_bfl(values), inputs), rtol=1e-5, atol=1e-5)
    assert relative_error(out, run(build_tiny_flux(), inputs)) < 0.15
    model.to(torch.bfloat16)  # the scale stays float32, the weight one byte
    assert to_k.weight_scale.dtype == torch.float32 and to_k.qweight.dtype == torch.uint8
    stray = dict(stored, **{"double_blocks.0.img_attn.norm.query_norm.scale_weight": torch.ones(())})
    with pytest.raises(UserError, match="query_norm.scale_weight"):
        load_flux_transformer(stray, dtype=torch.float32, device="cpu")


def test_float8_e5m2_and_quantize_linears():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.GELU(), torch.nn.Linear(8, 4, bias=False))
    original = net[0].weight.detach().clone()
    sd = {"0.weight": original.to(torch.float8_e5m2), "0.bias": net[0].bias.detach().clone(),
          "2.weight": net[2].weight.detach().clone()}
    swapped = quantize_linears(net, sd, dtype=torch.float32)
    assert swapped == ["0"] and list(sd) == ["2.weight"]  # the used entries are taken out
    layer = net[0]
    assert isinstance(layer, QuantizedLinear) and (layer.in_features, layer.out_features) == (32, 8)
    assert layer.qtype == "float8_e5m2" and layer.qweight.numel() == 32 * 8
    x = torch.randn(3, 32)
    w = layer.dequantized_weight(torch.float32)
    assert torch.equal(w, original.to(torch.float8_e5m2).float())  # the stored e5m2 values
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


# -- GGUF -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_gguf_file_dequantizes_exactly_and_runs(tmp_path, qtype):
    path = write_flux_gguf(tmp_path / f"flux1-dev-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "flux"
    reference_values = gguf_dequantized(path)
    tensors = read_gguf(path)
    assert set(tensors) == set(tiny_flux_bfl())
    quantized = {k for k, v in tensors.items() if isinstance(v, GGUFWeight)}
    # K-quant blocks hold 256 values: only the 256-wide inputs (MLP down projections, time_in) are quantized
    must = {"double_blocks.0.img_mlp.2.weight", "time_in.in_layer.weight"} if qtype.endswith("_K") else \
        {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"}
    assert must <= quantized
    for name, value in tensors.items():
        if isinstance(value, GGUFWeight):
            assert value.type_name == qtype and value.shape == reference_values[name].shape
            assert torch.equal(value.dequantize(torch.float32), reference_values[name]), name  # bit-exact
        else:
            assert value.dtype in (torch.float32, torch.float16)
            assert torch.equal(value.float(), reference_values[name]), name
    model = load_flux_transformer(tensors, dtype=torch.float32, device="cpu")
    swapped = [n for n in linear_names(model) if isinstance(model.get_submodule(n), QuantizedLinear)]
    assert swapped and all(model.get_submodule(n).qtype == qtype for n in swapped)
    if not qtype.endswith("_K"):  # the fused qkv was split into q, k, v without dequantizing
        qkv = reference_values["double_blocks.0.img_attn.qkv.weight"]
        q = model.get_submodule("transformer_blocks.0.attn.to_k")
        assert isinstance(q, QuantizedLinear)
        assert torch.equal(q.dequantized_weight(torch.float32), qkv[64:128])
        assert model.get_submodule("single_transformer_blocks.0.proj_mlp").qtype == qtype
    inputs = flux_inputs(tiny_flux_config())
    out = run(model, inputs)
    exact = run(reference_from_bfl(reference_values), inputs)
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    if qtype == "Q8_0":
        assert relative_error(out, run(build_tiny_flux(), inputs)) < 0.02
    elif qtype in ("Q4_0", "Q5_1"):
        assert relative_error(out, run(build_tiny_flux(), inputs)) < 0.25


def test_gguf_kquant_rows_and_memory(tmp_path):
    """A K-quant weight split by rows stays bit-exact; a Q4_K linear stores 4.5 bits per weight."""
    data = random_kquant_rows(6, 512, T.Q4_K, seed=3)
    weight = GGUFWeight(torch.from_numpy(data), T.Q4_K, (6, 512))
    full = torch.from_numpy(gguf.quants.dequantize(data, T.Q4_K))
    assert torch.equal(weight.dequantize(), full)
    assert torch.equal(weight.rows(2, 5).dequantize(), full[2:5])
    for qtype in (T.Q4_K, T.Q6_K, T.Q8_0):  # in a 16-bit compute dtype: within three of its roundings
        data = random_kquant_rows(6, 512, qtype, seed=4) if qtype != T.Q8_0 else \
            gguf.quants.quantize(np.random.default_rng(0).standard_normal((6, 512), dtype=np.float32), qtype)
        exact = torch.from_numpy(gguf.quants.dequantize(data, qtype))
        for dtype in (torch.bfloat16, torch.float16):
            ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
            got = GGUFWeight(torch.from_numpy(data), qtype, (6, 512)).dequantize(dtype)
            assert got.dtype == dtype
            assert ((got.float() - exact).abs() <= 3 * ulp * exact.abs() + 1e-7).all(), (qtype, dtype)
    bias = np.random.default_rng(1).standard_normal(96, dtype=np.float32)  # a quantized 1-D tensor (rare)
    q_bias = gguf.quants.quantize(bias, T.Q8_0)
    pieces = split_rows(GGUFWeight(torch.from_numpy(q_bias), T.Q8_0, (96,)), [16, 80])
    assert torch.equal(torch.cat(pieces), torch.from_numpy(gguf.quants.dequantize(q_bias, T.Q8_0)))
    layer = QuantizedLinear(weight, torch.zeros(6))
    assert layer.weight_bytes * 8 / (6 * 512) == 4.5
    x = torch.randn(2, 512)
    torch.testing.assert_close(layer(x), x @ full.T)


def test_gguf_bf16_tensors_and_bad_file(tmp_path):
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    values = np.arange(64, dtype=np.float32).reshape(2, 32) / 7
    writer.add_tensor("a.weight", gguf.quants.quantize(values, T.BF16), raw_dtype=T.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = read_gguf(path)
    assert tensors["a.weight"].dtype == torch.bfloat16 and tensors["a.weight"].shape == (2, 32)
    torch.testing.assert_close(tensors["a.weight"].float(), torch.from_numpy(values).to(torch.bfloat16).float())
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match="junk.gguf"):
        read_gguf(tmp_path / "junk.gguf")


# -- bitsandbytes NF4 --------------------------------------------------------------------------------
def test_nf4_reads_as_bitsandbytes_dequantizes():
    """A weight bitsandbytes 0.50.2 quantized on the CPU (NF4, blocks of 64, doubly quantized scales), saved as its
    QuantState.as_dict(packed=True) with bitsandbytes' own dequantize_4bit result beside it: Easel's reader gives the
    same values, bit for bit, without bitsandbytes."""
    sd = load_file(str(Path(__file__).parent / "data" / "nf4_bnb_known_answer.safetensors"))
    expected = sd.pop("expected.layer.weight")
    assert is_nf4(sd.keys())
    weight = read_nf4_weights(sd)["layer.weight"]
    assert isinstance(weight, NF4Weight) and weight.shape == (6, 256) and weight.nbytes < expected.numel()
    assert torch.equal(weight.dequantize(torch.bfloat16), expected)
    # rows split and joined again stay NF4 and keep their values
    top, bottom = split_rows(weight, [2, 4])
    assert isinstance(top, NF4Weight) and torch.equal(top.dequantize(torch.bfloat16), expected[:2])
    assert torch.equal(cat_rows([top, bottom]).dequantize(torch.bfloat16), expected)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quantized scales", "float32 scales"])
def test_nf4_file_loads_and_computes_with_its_values(tmp_path, nested):
    path, values = write_flux_nf4(tmp_path / "flux1-dev-bnb-nf4-v2.safetensors", nested=nested)
    sd = load_file(str(path))
    assert is_flux(sd.keys()) and is_nf4(sd.keys()) and not is_nf4(tiny_flux_bfl().keys())
    model = load_flux_transformer(sd, dtype=torch.float32, device="cpu")
    swapped = [n for n in linear_names(model) if isinstance(model.get_submodule(n), QuantizedLinear)]
    assert swapped and all(model.get_submodule(n).qtype == "nf4" for n in swapped)
    k = model.get_submodule("transformer_blocks.0.attn.to_k")  # the fused qkv split by rows, still NF4
    assert isinstance(k, QuantizedLinear) and k.qtype == "nf4"
    torch.testing.assert_close(k.dequantized_weight(torch.float32),
                               values["double_blocks.0.img_attn.qkv.weight"].float()[64:128])
    assert k.weight_bytes < k.in_features * k.out_features  # about half a byte per weight, plus its scales
    model.to(torch.bfloat16)  # its codes, scales and code book are not widened or rounded
    assert k.qweight.dtype == torch.uint8 and k.nf4_absmax.dtype == k.nf4_code.dtype == torch.float32
    model.float()
    inputs = flux_inputs(tiny_flux_config())
    out = run(model, inputs)
    exact = run(reference_from_bfl(values), inputs)  # the values the file stands for, placed independently
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    assert relative_error(out, run(build_tiny_flux(), inputs)) < 0.25  # 4 bits: near the unquantized model


def test_fp4_and_damaged_nf4_files_are_refused_with_the_alternatives(tmp_path):
    path, _ = write_flux_nf4(tmp_path / "flux1-dev-bnb-nf4-v2.safetensors")
    sd = load_file(str(path))
    state = next(k for k in sd if k.endswith(".quant_state.bitsandbytes__nf4"))
    fp4 = dict(sd)
    fp4[state.replace("nf4", "fp4")] = fp4.pop(state)
    with pytest.raises(UserError) as info:
        load_flux_transformer(fp4, dtype=torch.bfloat16, device="cpu")
    assert "FP4" in info.value.message and "GGUF" in info.value.message and "fp8" in info.value.message
    damaged = dict(sd)
    damaged[state.removesuffix(".quant_state.bitsandbytes__nf4") + ".absmax"] = torch.zeros(3)
    with pytest.raises(UserError, match="damaged"):
        load_flux_transformer(damaged, dtype=torch.bfloat16, device="cpu")