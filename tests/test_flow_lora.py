"""LoRA for FLUX and SD 3.5: every shared layout (kohya BFL/SAI names, diffusers/PEFT, ComfyUI's PEFT with BFL
names, XLabs) lands on the diffusers transformer's modules with exactly the update its math defines (fused
qkv / linear1 split by rows, the final modulation's halves swapped), the forward equals a model changed by
hand, removal restores every weight bit for bit, and quantized (float8) weights get the LoRA at compute time
without being touched."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from backend.engine.loaded_model import LoadedModel
from backend.engine.networks.activation import NetworkRuntime, activate_for_job
from backend.engine.networks.lora_apply import ActiveNetwork, NetworkPatcher
from backend.engine.networks.lora_files import read_network_file, split_key
from flow_factory import (Float8Linear, CastLinear, flux_bfl_shapes, lora_test_flux_transformer,
                          lora_test_sd3_transformer, quantize_blocks, write_flux_lora_kohya, write_flux_lora_peft,
                          write_flux_lora_xlabs, write_sd3_lora)
from lora_factory import save_lora, simple_lora

torch.set_num_threads(1)


# -- the expected mapping, written out independently of the code under test --------------------------------
def _swap(n: int) -> torch.Tensor:
    return torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])


def flux_pieces(t) -> dict[str, list[tuple[str, object]]]:
    """{BFL name: [(diffusers module, rows of the BFL weight it holds)]}."""
    d = t.x_embedder.out_features
    out = {"img_in": [("x_embedder", slice(None))], "txt_in": [("context_embedder", slice(None))],
           "final_layer.linear": [("proj_out", slice(None))],
           "final_layer.adaLN_modulation.1": [("norm_out.linear", _swap(2 * d))]}
    for i, _ in enumerate(t.transformer_blocks):
        o, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        out[f"{b}.img_attn.qkv"] = [(f"{o}.attn.to_q", slice(0, d)), (f"{o}.attn.to_k", slice(d, 2 * d)),
                                    (f"{o}.attn.to_v", slice(2 * d, 3 * d))]
        out[f"{b}.txt_attn.qkv"] = [(f"{o}.attn.add_q_proj", slice(0, d)), (f"{o}.attn.add_k_proj", slice(d, 2 * d)),
                                    (f"{o}.attn.add_v_proj", slice(2 * d, 3 * d))]
        for bfl, ours in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                          ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"), ("txt_mlp.0", "ff_context.net.0.proj"),
                          ("txt_mlp.2", "ff_context.net.2"), ("img_mod.lin", "norm1.linear"),
                          ("txt_mod.lin", "norm1_context.linear")):
            out[f"{b}.{bfl}"] = [(f"{o}.{ours}", slice(None))]
    for i, blk in enumerate(t.single_transformer_blocks):
        o, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        mlp = blk.proj_mlp.out_features
        out[f"{b}.linear1"] = [(f"{o}.attn.to_q", slice(0, d)), (f"{o}.attn.to_k", slice(d, 2 * d)),
                               (f"{o}.attn.to_v", slice(2 * d, 3 * d)), (f"{o}.proj_mlp", slice(3 * d, 3 * d + mlp))]
        out[f"{b}.xlabs_qkv"] = out[f"{b}.linear1"][:3]
        out[f"{b}.linear2"] = [(f"{o}.proj_out", slice(None))]
        out[f"{b}.modulation.lin"] = [(f"{o}.norm.linear", slice(None))]
    return out


def sd3_pieces(t) -> dict[str, list[tuple[str, object]]]:
    d = t.config.num_attention_heads * t.config.attention_head_dim
    out = {"x_embedder.proj": [("pos_embed.proj", slice(None))], "context_embedder": [("context_embedder", slice(None))],
           "final_layer.linear": [("proj_out", slice(None))],
           "final_layer.adaLN_modulation.1": [("norm_out.linear", _swap(2 * d))]}
    for i, blk in enumerate(t.transformer_blocks):
        o, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        qkv = lambda a, q, k, v: [(f"{o}.{a}.{q}", slice(0, d)), (f"{o}.{a}.{k}", slice(d, 2 * d)),  # noqa: E731
                                  (f"{o}.{a}.{v}", slice(2 * d, 3 * d))]
        out[f"{j}.x_block.attn.qkv"] = qkv("attn", "to_q", "to_k", "to_v")
        out[f"{j}.x_block.attn2.qkv"] = qkv("attn2", "to_q", "to_k", "to_v")
        out[f"{j}.context_block.attn.qkv"] = qkv("attn", "add_q_proj", "add_k_proj", "add_v_proj")
        for sai, ours in (("x_block.attn.proj", "attn.to_out.0"), ("x_block.attn2.proj", "attn2.to_out.0"),
                          ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
                          ("x_block.adaLN_modulation.1", "norm1.linear"), ("context_block.attn.proj", "attn.to_add_out"),
                          ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2")):
            out[f"{j}.{sai}"] = [(f"{o}.{ours}", slice(None))]
        rows = _swap(2 * d) if blk.context_pre_only else slice(None)
        out[f"{j}.context_block.adaLN_modulation.1"] = [(f"{o}.norm1_context.linear", rows)]
    return out


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """up @ down in the weight's layout (conv kernels as LoCon writes them), times `scale`."""
    if down.ndim == 4:
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double()).float() * scale
    return (up.double() @ down.double()).float() * scale


def expected_deltas(pairs: dict[str, tuple], pieces: dict[str, list] | None) -> dict[str, torch.Tensor]:
    """{diffusers module: weight delta} from {file module name: (down, up, scale)}; `pieces` maps the file's
    (fused) names to diffusers modules, None when the names are diffusers' own."""
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in pairs.items():
        full = lora_delta(down, up, scale)
        targets = pieces[name] if pieces is not None else [(name, slice(None))]
        for module, rows in targets:
            part = full[rows]
            out[module] = out[module] + part if module in out else part
    return out


def _pairs(tensors: dict, down_suffix: str, up_suffix: str, strip_prefix: str) -> dict[str, tuple]:
    """{module name without `strip_prefix`: (down, up, alpha/rank or 1)}."""
    pairs = {}
    for key, down in tensors.items():
        if not key.endswith(down_suffix):
            continue
        base = key[: -len(down_suffix)]
        up = tensors[base + up_suffix]
        alpha = tensors.get(base + ".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        name = base[len(strip_prefix):]
        pairs[name] = (down, up, scale)
    return pairs


def kohya_pairs(tensors: dict, names: dict[str, str]) -> dict[str, tuple]:
    """kohya keys have "_" for "."; `names` maps the underscored BFL/SAI names back to dotted ones."""
    raw = _pairs({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, ".lora_down.weight",
                 ".lora_up.weight", "lora_unet_")
    return {names[k]: v for k, v in raw.items()}


# -- helpers -------------------------------------------------------------------------------------------
def flow_model(family: str, transformer, text_encoders: dict | None = None):
    """The parts of a `FlowModel` the LoRA code reads."""
    return SimpleNamespace(family=family, transformer=transformer, unet=transformer, text_encoders=text_encoders or {})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        a, b = now[k], v
        if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{k} differs"


def check_weights(transformer, before: dict, deltas: dict[str, torch.Tensor], multiplier: float) -> None:
    """Every weight with a delta = original + multiplier * delta; every other tensor unchanged."""
    changed = {f"{m}.weight" for m in deltas}
    for key, value in transformer.state_dict().items():
        if key in changed:
            want = before[key] + multiplier * deltas[key[: -len(".weight")]].reshape(value.shape)
            torch.testing.assert_close(value, want, atol=2e-5, rtol=1e-5, msg=f"{key}")
        else:
            assert torch.equal(value, before[key]), f"{key} changed"


def by_hand(transformer, deltas: dict[str, torch.Tensor], multiplier: float):
    """A copy of `transformer` whose weights were changed by hand."""
    ref = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, delta in deltas.items():
            w = ref.get_submodule(name).weight
            w.add_(multiplier * delta.reshape(w.shape))
    return ref


def flux_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img, txt = 6, 5
    return dict(hidden_states=torch.randn(1, img, 16, generator=g), encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
                pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.tensor([0.6]),
                img_ids=torch.randn(img, 3, generator=g), txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


def sd3_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.tensor([600.0]), return_dict=False)


@torch.no_grad()
def run(transformer, inputs: dict) -> torch.Tensor:
    return transformer(**inputs)[0]


def _underscored(names) -> dict[str, str]:
    return {n.replace(".", "_"): n for n in names}


# -- FLUX ----------------------------------------------------------------------------------------------
FLUX_FORMATS = ["kohya", "peft", "peft_base_model", "comfy_bfl", "xlabs", "kohya_diffusers_names"]


def _write_flux(fmt: str, path, t) -> dict[str, torch.Tensor]:
    """Write a file in `fmt`; the expected {diffusers module: delta}."""
    pieces = flux_pieces(t)
    if fmt == "kohya":
        tensors = write_flux_lora_kohya(path, t, rank=4, alpha=2.0)
        return expected_deltas(kohya_pairs(tensors, _underscored(flux_bfl_shapes(t))), pieces)
    if fmt in ("peft", "peft_base_model"):
        prefix = "transformer." if fmt == "peft" else "base_model.model."
        tensors = write_flux_lora_peft(path, t, rank=3, prefix=prefix)
        return expected_deltas(_pairs(tensors, ".lora_A.weight", ".lora_B.weight", prefix), None)
    if fmt == "comfy_bfl":
        tensors = write_flux_lora_peft(path, t, rank=3, names="bfl", alpha=6.0)
        return expected_deltas(_pairs(tensors, ".lora_A.weight", ".lora_B.weight", "diffusion_model."), pieces)
    if fmt == "xlabs":
        tensors = write_flux_lora_xlabs(path, t, rank=2)
        pairs = {}
        names = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
                 "proj_lora2": "txt_attn.proj", "qkv_lora": "xlabs_qkv", "proj_lora": "linear2"}
        for key, down in tensors.items():
            if key.endswith(".down.weight"):
                blocks, index, _, layer = key[: -len(".down.weight")].split(".")
                pairs[f"{blocks}.{index}.{names[layer]}"] = (down, tensors[key.replace(".down.", ".up.")], 1.0)
        return expected_deltas(pairs, pieces)
    if fmt == "kohya_diffusers_names":  # `lora_transformer_` + diffusers names with "_" (some FLUX trainers)
        written = write_flux_lora_peft(path, t, rank=2)
        tensors = {}
        for key, value in written.items():
            module, _, part = key[len("transformer."):].rpartition(".lora_")
            suffix = ".lora_down.weight" if part.startswith("A") else ".lora_up.weight"
            tensors["lora_transformer_" + module.replace(".", "_") + suffix] = value
            if part.startswith("A"):
                tensors["lora_transformer_" + module.replace(".", "_") + ".alpha"] = torch.tensor(1.0)
        from safetensors.torch import save_file
        save_file(tensors, str(path))
        names = {n.replace(".", "_"): n for n, _ in t.named_modules()}
        raw = _pairs(tensors, ".lora_down.weight", ".lora_up.weight", "lora_transformer_")
        return expected_deltas({names[k]: v for k, v in raw.items()}, None)
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", FLUX_FORMATS)
def test_flux_lora_formats_merge_exactly_and_come_out_bit_for_bit(tmp_path, fmt):
    t = lora_test_flux_transformer(seed=0, layers=2, single_layers=2)
    path = tmp_path / f"{fmt}.safetensors"
    deltas = _write_flux(fmt, path, t)
    if fmt == "kohya":  # the fused layers are all there: qkv split by rows, linear1 into q/k/v/proj_mlp
        assert {"transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_mlp", "norm_out.linear"} <= deltas.keys()
    before, inputs = snapshot(t), flux_inputs()
    out_before = run(t, inputs)
    file = read_network_file(path)
    assert file.family == "flux" and file.unknown_keys == []
    loaded = LoadedModel(flow_model("flux", t))
    report = NetworkPatcher(loaded).apply([ActiveNetwork(file, 1.0, 0.7, label=fmt)])[0]
    assert report.used and report.applied == len(file.modules) and report.unmatched == report.mismatched == 0
    check_weights(t, before, deltas, 0.7)
    torch.testing.assert_close(run(t, inputs), run(_hand(t, before, deltas, 0.7), inputs), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(run(t, inputs), out_before, atol=1e-3)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(t, before)
    assert not loaded.lora.active
    assert torch.equal(run(t, inputs), out_before)


def _hand(t, before: dict, deltas: dict, multiplier: float):
    """A model with the original weights, changed by hand."""
    ref = copy.deepcopy(t)
    ref.load_state_dict(before)
    return by_hand(ref, deltas, multiplier)


def test_row_split_of_the_fused_layers_by_the_formula(tmp_path):
    """kohya's img_attn.qkv / linear1: to_k = W_k + a/r * up[D:2D] @ down, proj_mlp = W + a/r * up[3D:] @ down."""
    t = lora_test_flux_transformer(seed=3)
    d = t.x_embedder.out_features
    tensors = write_flux_lora_kohya(tmp_path / "k.safetensors", t, rank=4, alpha=2.0)
    before = snapshot(t)
    loaded = LoadedModel(flow_model("flux", t))
    NetworkPatcher(loaded).apply([ActiveNetwork(read_network_file(tmp_path / "k.safetensors"), 1.0, 1.0)])
    down = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    want_k = before["transformer_blocks.0.attn.to_k.weight"] + 0.5 * up[d:2 * d] @ down
    torch.testing.assert_close(t.transformer_blocks[0].attn.to_k.weight, want_k)
    down = tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    want_mlp = before["single_transformer_blocks.0.proj_mlp.weight"] + 0.5 * up[3 * d:] @ down
    torch.testing.assert_close(t.single_transformer_blocks[0].proj_mlp.weight, want_mlp)
    # the final modulation: BFL (shift, scale) -> diffusers (scale, shift)
    down = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    want_scale = before["norm_out.linear.weight"][:d] + 0.5 * up[d:] @ down
    torch.testing.assert_close(t.norm_out.linear.weight[:d], want_scale)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(t, before)


def test_lycoris_module_on_a_fused_layer_is_split_by_rows(tmp_path):
    """A LoHa on `linear1`: its full update (w1a@w1b * w2a@w2b) cut into the q/k/v/proj_mlp rows."""
    t = lora_test_flux_transformer(seed=4)
    d, mlp = t.x_embedder.out_features, t.single_transformer_blocks[0].proj_mlp.out_features
    rows, g = 3 * d + mlp, torch.Generator().manual_seed(5)
    parts = {"hada_w1_a": torch.randn(rows, 2, generator=g), "hada_w1_b": torch.randn(2, d, generator=g),
             "hada_w2_a": torch.randn(rows, 2, generator=g), "hada_w2_b": torch.randn(2, d, generator=g),
             "alpha": torch.tensor(1.0)}
    save_lora(tmp_path / "loha.safetensors", {f"lora_unet_single_blocks_0_linear1.{k}": v for k, v in parts.items()})
    full = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * 0.5
    before = snapshot(t)
    loaded = LoadedModel(flow_model("flux", t))
    report = NetworkPatcher(loaded).apply([ActiveNetwork(read_network_file(tmp_path / "loha.safetensors"), 1.0, 0.8)])[0]
    assert report.applied == 1
    o = "single_transformer_blocks.0"
    deltas = {f"{o}.attn.to_q": full[:d], f"{o}.attn.to_k": full[d:2 * d], f"{o}.attn.to_v": full[2 * d:3 * d],
              f"{o}.proj_mlp": full[3 * d:]}
    check_weights(t, before, deltas, 0.8)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(t, before)
    # On quantized weights the same full-size update is added at compute time, row by row.
    quantize_blocks(t, kind="quantized")
    ref = lora_test_flux_transformer(seed=4)
    with torch.no_grad():
        for name, module in t.named_modules():
            if isinstance(module, Float8Linear):
                ref.get_submodule(name).weight.copy_(module.weight.to(torch.float32))
    ref = by_hand(ref, deltas, 0.8)
    before, inputs = snapshot(t), flux_inputs()
    loaded = LoadedModel(flow_model("flux", t))
    NetworkPatcher(loaded).apply([ActiveNetwork(read_network_file(tmp_path / "loha.safetensors"), 1.0, 0.8)])
    assert len(loaded.lora.hooks) == 4 and not loaded.lora.backup
    torch.testing.assert_close(run(t, inputs), run(ref, inputs), atol=1e-4, rtol=1e-4)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(t, before)


# -- SD3 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_sd3_lora_formats_merge_exactly_and_come_out_bit_for_bit(tmp_path, fmt):
    from flow_factory import sd3_sai_shapes

    t = lora_test_sd3_transformer(seed=0)
    path = tmp_path / f"sd3_{fmt}.safetensors"
    tensors = write_sd3_lora(path, t, rank=3, alpha=1.5, fmt=fmt)
    if fmt == "kohya":
        deltas = expected_deltas(kohya_pairs(tensors, _underscored(sd3_sai_shapes(t))), sd3_pieces(t))
        # the last block's context modulation and the final one are swapped; SD 3.5 Medium's attn2 is there
        assert {"transformer_blocks.1.norm1_context.linear", "transformer_blocks.0.attn2.to_v",
                "pos_embed.proj"} <= deltas.keys()
    else:
        deltas = expected_deltas(_pairs(tensors, ".lora_A.weight", ".lora_B.weight", "transformer."), None)
    before, inputs = snapshot(t), sd3_inputs()
    out_before = run(t, inputs)
    file = read_network_file(path)
    assert file.family == "sd3" and file.unknown_keys == []
    loaded = LoadedModel(flow_model("sd3", t))
    report = NetworkPatcher(loaded).apply([ActiveNetwork(file, 1.0, 1.3, label=fmt)])[0]
    assert report.used and report.applied == len(file.modules) and report.unmatched == report.mismatched == 0
    check_weights(t, before, deltas, 1.3)
    torch.testing.assert_close(run(t, inputs), run(_hand(t, before, deltas, 1.3), inputs), atol=1e-5, rtol=1e-4)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(t, before)
    assert torch.equal(run(t, inputs), out_before)


# -- quantized weights: added at compute time ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["quantized", "float8"])
def test_quantized_weights_get_the_lora_at_compute_time(tmp_path, kind):
    t = lora_test_flux_transformer(seed=2)
    kohya = write_flux_lora_kohya(tmp_path / "k.safetensors", t, rank=4, alpha=2.0)
    xlabs = write_flux_lora_xlabs(tmp_path / "x.safetensors", t, rank=2, seed=9)
    quantize_blocks(t, kind=kind)
    assert isinstance(t.transformer_blocks[0].attn.to_q, Float8Linear if kind == "quantized" else CastLinear)
    pieces = flux_pieces(t)
    deltas = expected_deltas(kohya_pairs(kohya, _underscored(flux_bfl_shapes(t))), pieces)
    names = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
             "proj_lora2": "txt_attn.proj", "qkv_lora": "xlabs_qkv", "proj_lora": "linear2"}
    xpairs = {}
    for key, down in xlabs.items():
        if key.endswith(".down.weight"):
            blocks, index, _, layer = key[: -len(".down.weight")].split(".")
            xpairs[f"{blocks}.{index}.{names[layer]}"] = (down, xlabs[key.replace(".down.", ".up.")], 1.0)
    xdeltas = expected_deltas(xpairs, pieces)

    # The reference: the dequantized weights in float32 plain Linears, changed by hand.
    ref = lora_test_flux_transformer(seed=2)
    with torch.no_grad():
        for name, module in t.named_modules():
            if isinstance(module, (Float8Linear, CastLinear)):
                ref.get_submodule(name).weight.copy_(module.weight.to(torch.float32))
        for table, mult in ((deltas, 0.6), (xdeltas, 1.0)):
            for name, delta in table.items():
                w = ref.get_submodule(name).weight
                w.add_(mult * delta.reshape(w.shape))

    before, inputs = snapshot(t), flux_inputs()
    out_before = run(t, inputs)
    loaded = LoadedModel(flow_model("flux", t))
    reports = NetworkPatcher(loaded).apply([
        ActiveNetwork(read_network_file(tmp_path / "k.safetensors"), 1.0, 0.6, label="k"),
        ActiveNetwork(read_network_file(tmp_path / "x.safetensors"), 1.0, 1.0, label="x")])
    assert all(r.used and r.mismatched == r.unmatched == 0 for r in reports)
    assert loaded.lora.hooks and loaded.lora.active
    # the stored float8 weights are untouched; the unquantized layers outside the blocks were merged
    for key in before:
        if before[key].dtype == torch.float8_e4m3fn:
            assert torch.equal(t.state_dict()[key].view(torch.uint8), before[key].view(torch.uint8))
    assert not torch.equal(t.x_embedder.weight, before["x_embedder.weight"])
    # the output = the dequantized weights + the deltas (float8 rounding is on both sides: a tight tolerance)
    torch.testing.assert_close(run(t, inputs), run(ref, inputs), atol=1e-4, rtol=1e-4)
    # the same set again changes nothing; removal takes every hook away
    NetworkPatcher(loaded).apply([
        ActiveNetwork(read_network_file(tmp_path / "k.safetensors"), 1.0, 0.6, label="k"),
        ActiveNetwork(read_network_file(tmp_path / "x.safetensors"), 1.0, 1.0, label="x")])
    assert sum(len(m._forward_hooks) for m in t.modules()) == len(loaded.lora.hooks)
    NetworkPatcher(loaded).apply([])
    assert not loaded.lora.hooks and not loaded.lora.active
    assert sum(len(m._forward_hooks) for m in t.modules()) == 0
    assert_bitwise(t, before)
    assert torch.equal(run(t, inputs), out_before)


# -- text encoders, other base models, unknown keys ----------------------------------------------------
def _tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    return CLIPTextModel(cfg).eval()


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=99, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)
    return T5EncoderModel(cfg).eval()


def test_text_encoder_modules_of_a_flux_lora(tmp_path):
    """lora_te1_ goes into CLIP-L with the te multiplier, lora_te3_ into T5; with no T5 loaded it is reported."""
    t, clip, t5 = lora_test_flux_transformer(seed=0), _tiny_clip(), _tiny_t5()
    tensors = write_flux_lora_kohya(tmp_path / "te.safetensors", t, rank=2, alpha=1.0, clip_l=clip, t5_keys=True)
    file = read_network_file(tmp_path / "te.safetensors")
    assert file.family == "flux"
    te_before, t5_before = snapshot(clip), snapshot(t5)
    loaded = LoadedModel(flow_model("flux", t, {"clip_l": clip, "t5xxl": t5}))
    report = NetworkPatcher(loaded).apply([ActiveNetwork(file, 0.5, 1.0)])[0]
    assert report.applied == len(file.modules) and report.unmatched == 0
    key = "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    q_key = next(k for k in te_before if k.endswith("encoder.layers.1.self_attn.q_proj.weight"))
    want = te_before[q_key] + 0.5 * 0.5 * up @ down
    torch.testing.assert_close(clip.get_submodule(q_key[: -len(".weight")]).weight, want)
    key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    want = t5_before["encoder.block.0.layer.0.SelfAttention.q.weight"] + \
        0.5 * tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    torch.testing.assert_close(t5.encoder.block[0].layer[0].SelfAttention.q.weight, want)
    NetworkPatcher(loaded).apply([])
    assert_bitwise(clip, te_before)
    assert_bitwise(t5, t5_before)
    # Without the T5 loaded, its module matches nothing and is counted as such.
    loaded = LoadedModel(flow_model("flux", t, {"clip_l": clip}))
    report = NetworkPatcher(loaded).apply([ActiveNetwork(file, 1.0, 1.0)])[0]
    assert report.used and report.unmatched == 1
    NetworkPatcher(loaded).apply([])


def test_loras_for_other_base_models_are_skipped_with_a_reason(tmp_path):
    flux, sd3 = lora_test_flux_transformer(), lora_test_sd3_transformer()
    sd1 = save_lora(tmp_path / "sd1.safetensors", simple_lora("sd1"), family="sd1")
    write_flux_lora_kohya(tmp_path / "flux.safetensors", flux)
    write_sd3_lora(tmp_path / "sd3.safetensors", sd3, metadata={"ss_base_model_version": "sd3m"})
    assert read_network_file(tmp_path / "sd3.safetensors").family == "sd3"
    report = NetworkPatcher(LoadedModel(flow_model("flux", flux))).apply(
        [ActiveNetwork(read_network_file(sd1), label="sd1")])[0]
    assert report.skipped_reason and "SD 1.x" in report.skipped_reason and "FLUX.1" in report.skipped_reason
    report = NetworkPatcher(LoadedModel(flow_model("sd3", sd3))).apply(
        [ActiveNetwork(read_network_file(tmp_path / "flux.safetensors"), label="flux")])[0]
    assert "FLUX.1" in report.skipped_reason and "SD 3" in report.skipped_reason


def test_key_layouts_parse():
    assert split_key("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")[:3] == \
        ("unet", "double_blocks_0_img_attn_qkv", "lora_down.weight")
    assert split_key("transformer.single_transformer_blocks.3.attn.to_q.lora_B.weight")[:3] == \
        ("unet", "single_transformer_blocks_3_attn_to_q", "lora_up.weight")
    assert split_key("diffusion_model.double_blocks.2.txt_mod.lin.lora_A.weight")[:3] == \
        ("unet", "double_blocks_2_txt_mod_lin", "lora_down.weight")
    assert split_key("double_blocks.4.processor.qkv_lora2.up.weight")[:3] == \
        ("unet", "double_blocks_4_txt_attn_qkv", "lora_up.weight")
    assert split_key("single_blocks.7.processor.proj_lora.down.weight")[:3] == \
        ("unet", "single_blocks_7_linear2", "lora_down.weight")
    assert split_key("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.alpha")[:3] == \
        ("te3", "text_model_encoder_block_0_layer_1_DenseReluDense_wi_0", "alpha")
    assert split_key("text_encoder_3.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight")[0] == "te3"
    assert split_key("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha")[:2] == ("unet", "joint_blocks_0_x_block_attn_qkv")
    assert split_key("lycoris_single_blocks_0_linear1.lokr_w1")[:3] == ("unet", "single_blocks_0_linear1", "lokr_w1")
    assert split_key("lora_transformer_single_transformer_blocks_0_proj_out.lora_up.weight")[:2] == \
        ("unet", "single_transformer_blocks_0_proj_out")


def test_unknown_keys_and_unmatched_modules_are_reported_in_the_job(tmp_path):
    """Through the job's activation: hashes in the infotext, a warning naming the modules that were not applied."""
    t = lora_test_flux_transformer(seed=0)
    lora_dir = tmp_path / "Lora"
    extra = {"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": torch.randn(2, 16),  # no block 9
             "lora_unet_double_blocks_9_img_attn_qkv.lora_up.weight": torch.randn(48, 2),
             "some_trainer_state.step": torch.tensor(3.0)}
    write_flux_lora_kohya(lora_dir / "style.safetensors", t, rank=2, extra=extra)
    file = read_network_file(lora_dir / "style.safetensors")
    assert file.unknown_keys == ["some_trainer_state.step"]
    before = snapshot(t)
    runtime = NetworkRuntime([lora_dir], tmp_path / "embeddings", tmp_path / "cache")
    loaded = LoadedModel(flow_model("flux", t))
    ctx = SimpleNamespace(model=loaded.model, loaded=loaded, extra_params={}, warnings=[], embeddings=None)
    request = SimpleNamespace(prompt="a cat <lora:style:0.8>", negative_prompt="", disable_extra_networks=False)
    activate_for_job(request, ctx, runtime)
    assert ctx.extra_params["Lora hashes"].startswith("style: ")
    assert any("1 of its" in w and "1 match no layer" in w for w in ctx.warnings), ctx.warnings
    assert not torch.equal(t.transformer_blocks[0].attn.to_q.weight, before["transformer_blocks.0.attn.to_q.weight"])
    ctx = SimpleNamespace(model=loaded.model, loaded=loaded, extra_params={}, warnings=[], embeddings=None)
    activate_for_job(SimpleNamespace(prompt="a cat", negative_prompt="", disable_extra_networks=False), ctx, runtime)
    assert "Lora hashes" not in ctx.extra_params and ctx.warnings == []
    assert_bitwise(t, before)


def test_base_model_from_kohya_metadata():
    """What the LoRA cards' badge and the family check read: sd-scripts' `ss_base_model_version` / modelspec."""
    from backend.networks.registry import FAMILY_LABELS, detect_family

    assert detect_family({"ss_base_model_version": "flux1"}, set()) == "flux"
    assert detect_family({"modelspec.architecture": "flux-1-dev/lora"}, set()) == "flux"
    assert detect_family({"ss_base_model_version": "sd3m"}, set()) == "sd3"
    assert detect_family({"modelspec.architecture": "stable-diffusion-v3.5-large/lora"}, set()) == "sd3"
    assert detect_family({"ss_base_model_version": "sdxl_base_v1-0"}, set()) == "sdxl"
    assert FAMILY_LABELS["flux"] == "FLUX.1" and FAMILY_LABELS["sd3"] == "SD 3"
