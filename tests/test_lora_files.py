"""LoRA / LyCORIS files of every supported layout and type: each changes exactly the weights it targets,
by exactly the update its math defines, and removing it restores the weights bit for bit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from backend.core.errors import UserError
from backend.engine.loaded_model import LoadedModel
from backend.engine.networks.lora_apply import ActiveNetwork, NetworkPatcher, add_updates, target_table
from backend.engine.networks.lora_files import read_network_file, split_key
from lora_factory import build_file, save_lora, simple_lora

torch.set_num_threads(1)




def snapshot(model) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    for i, enc in enumerate(model.text_encoders):
        out.update({f"te{i + 1}.{k}": v.clone() for k, v in enc.state_dict().items()})
    return out


def module_of(model, part: str, name: str) -> torch.nn.Module:
    if part == "unet":
        return model.unet.get_submodule(name)
    enc = model.text_encoders[int(part[2:]) - 1]
    return getattr(enc, "text_model", enc).get_submodule(name) if name != "text_projection" else enc.text_projection


def cp(core, wa, wb):
    """CP/Tucker rebuild, written out: W[o, n, k, l] = sum_ij core[i, j, k, l] wa[i, o] wb[j, n]."""
    return torch.einsum("ijkl,io,jn->onkl", core, wa, wb)


def expected_update(t: dict, shape: tuple, dyn: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The update (weight, bias) the file's parts define, before the user's multiplier."""
    t = {k: v.to(torch.float32) for k, v in t.items()}
    alpha = t["alpha"].item() if "alpha" in t else None
    bias = None
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:
            w = torch.einsum("ijkl,oi,jn->onkl", t["lora_mid.weight"], up[:, :, 0, 0], down[:, :, 0, 0])
        elif down.ndim == 4:
            w = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            if dyn:
                up, down = up[:, :dyn], down[:dyn]
            w = up @ down
        w = w.reshape(shape) * (alpha / rank if alpha is not None else 1.0)
    elif "hada_w1_a" in t:
        def half(i):
            if f"hada_t{i}" in t:
                return cp(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])
            return (t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]).reshape(shape)
        rank = t["hada_w1_b"].shape[0]
        w = half(1) * half(2) * (alpha / rank)
    elif "lokr_w1" in t:
        w1 = t["lokr_w1"]
        rank = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()
            w = torch.kron(w1[:, :, None, None].contiguous(), w2)
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
                w = torch.kron(w1[:, :, None, None].contiguous(), w2.contiguous())
            else:
                w = torch.kron(w1, w2)
        w = w.reshape(shape) * (alpha / rank)
    elif "diff" in t:
        w, bias = t["diff"], t["diff_b"]
    elif "w_norm" in t:
        w, bias = t["w_norm"], t["b_norm"]
    else:
        raise AssertionError(f"unknown parts {sorted(t)}")
    return w, bias


def check_applied(model, file_tensors: dict, modules: list[dict], key_of, te: float, unet: float, before: dict,
                  dyn: int | None = None) -> None:
    touched = set()
    for m in modules:
        module = module_of(model, m["part"], m["module"])
        base = key_of(m)
        parts = {k[len(base) + 1:]: v for k, v in file_tensors.items() if k.startswith(base + ".")}
        w, b = expected_update(parts, tuple(module.weight.shape), dyn)
        mult = te if m["part"] != "unet" else unet
        prefix = "unet." if m["part"] == "unet" else f"{m['part']}."
        full = m["module"] if m["part"] == "unet" else _te_key(model, m)
        orig_w = before[prefix + full + ".weight"]
        assert torch.allclose(module.weight, orig_w + mult * w, atol=1e-6, rtol=1e-5), m
        assert not torch.equal(module.weight, orig_w) or mult == 0
        touched.add(prefix + full + ".weight")
        if b is not None:
            assert torch.allclose(module.bias, before[prefix + full + ".bias"] + mult * b, atol=1e-6, rtol=1e-5)
            touched.add(prefix + full + ".bias")
    after = snapshot(model)
    untouched = [k for k in before if k not in touched and not torch.equal(before[k], after[k])]
    assert not untouched, f"weights changed that no module targets: {untouched[:5]}"


def _te_key(model, m) -> str:
    enc = model.text_encoders[int(m["part"][2:]) - 1]
    return ("text_model." if hasattr(enc, "text_model") else "") + m["module"]


SD1_MODULES = {
    "lora_linear": {"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "kind": "lora", "rank": 4, "alpha": 2.0},
    "lora_conv_1x1": {"part": "unet", "module": "down_blocks.0.attentions.0.proj_in", "kind": "lora", "rank": 2, "alpha": 1.0},
    "locon_3x3": {"part": "unet", "module": "down_blocks.0.resnets.0.conv1", "kind": "lora", "rank": 3, "alpha": 1.5},
    "locon_tucker": {"part": "unet", "module": "up_blocks.0.resnets.0.conv2", "kind": "lora", "rank": 2, "alpha": 1.0, "tucker": True},
    "lora_te": {"part": "te1", "module": "encoder.layers.0.self_attn.q_proj", "kind": "lora", "rank": 2, "alpha": 0.5},
    "loha_linear": {"part": "unet", "module": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "kind": "loha", "rank": 2, "alpha": 1.0},
    "loha_conv": {"part": "unet", "module": "down_blocks.1.resnets.0.conv1", "kind": "loha", "rank": 2, "alpha": 2.0},
    "loha_tucker": {"part": "unet", "module": "up_blocks.0.resnets.1.conv1", "kind": "loha", "rank": 2, "alpha": 1.0, "tucker": True},
    "lokr_linear": {"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "kind": "lokr", "rank": 2, "alpha": 1.0},
    "lokr_conv": {"part": "unet", "module": "mid_block.resnets.0.conv1", "kind": "lokr", "rank": 2, "alpha": 1.0},
    "lokr_tucker": {"part": "unet", "module": "mid_block.resnets.1.conv2", "kind": "lokr", "rank": 2, "alpha": 1.0, "tucker": True},
    "lokr_te": {"part": "te1", "module": "encoder.layers.1.mlp.fc1", "kind": "lokr", "rank": 2, "alpha": 1.0},
    "full": {"part": "unet", "module": "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "kind": "full"},
    "full_te": {"part": "te1", "module": "encoder.layers.1.self_attn.out_proj", "kind": "full"},
    "norm_group": {"part": "unet", "module": "down_blocks.0.resnets.0.norm1", "kind": "norm"},
    "norm_layer": {"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.norm1", "kind": "norm"},
    "norm_te": {"part": "te1", "module": "encoder.layers.0.layer_norm1", "kind": "norm"},
}


@pytest.mark.parametrize("case", sorted(SD1_MODULES))
def test_each_module_type_changes_its_weight_as_the_math_says(sd1, tmp_path, case):
    m = SD1_MODULES[case]
    tensors = build_file("sd1", [m], seed=hash(case) % 1000)
    path = save_lora(tmp_path / f"{case}.safetensors", tensors, family="sd1")
    net = read_network_file(path)
    assert net.family == "sd1"
    before = snapshot(sd1)
    patcher = NetworkPatcher(LoadedModel(sd1))
    reports = patcher.apply([ActiveNetwork(net, te_multiplier=0.7, unet_multiplier=-1.3, label=case)])
    try:
        assert reports[0].applied == 1 and reports[0].used
        check_applied(sd1, tensors, [m], lambda mm: _kohya_base("sd1", mm), 0.7, -1.3, before)
    finally:
        patcher.apply([])
    after = snapshot(sd1)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact restore


def _kohya_base(family, m):
    from lora_factory import kohya_name
    return kohya_name(family, m["part"], m["module"], ldm=m.get("ldm"))


def test_all_types_in_one_lycoris_file_with_two_stacked_networks(sd1, tmp_path):
    mods = list(SD1_MODULES.values())
    first = build_file("sd1", mods, seed=7)
    second_mods = [SD1_MODULES["lora_linear"], SD1_MODULES["lora_te"]]
    second = build_file("sd1", second_mods, seed=8)
    a = read_network_file(save_lora(tmp_path / "all.safetensors", first, family="sd1"))
    b = read_network_file(save_lora(tmp_path / "two.safetensors", second, family="sd1"))
    assert a.kinds() == {"lora": 5, "loha": 3, "lokr": 4, "full": 2, "norm": 3}
    before = snapshot(sd1)
    patcher = NetworkPatcher(LoadedModel(sd1))
    patcher.apply([ActiveNetwork(a, 1.0, 1.0), ActiveNetwork(b, 0.5, 2.0)])
    try:
        q = module_of(sd1, "unet", SD1_MODULES["lora_linear"]["module"])
        base = _kohya_base("sd1", SD1_MODULES["lora_linear"])
        wa, _ = expected_update({k[len(base) + 1:]: v for k, v in first.items() if k.startswith(base + ".")}, tuple(q.weight.shape))
        wb, _ = expected_update({k[len(base) + 1:]: v for k, v in second.items() if k.startswith(base + ".")}, tuple(q.weight.shape))
        orig = before["unet." + SD1_MODULES["lora_linear"]["module"] + ".weight"]
        assert torch.allclose(q.weight, orig + wa + 2.0 * wb, atol=1e-6)
        assert len(patcher.state.backup) == len(mods) + 5  # each touched tensor backed up once (2 full + 3 norm: + bias)
    finally:
        patcher.apply([])
    assert all(torch.equal(v, snapshot(sd1)[k]) for k, v in before.items())


def test_kohya_ldm_names_and_diffusers_names_reach_the_same_modules(sd1, tmp_path):
    """Tiny SD1 (one resnet per level): LDM input_blocks.1 = down_blocks.0, output_blocks.2 = up_blocks.1[0]."""
    pairs = [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
             ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
             ("up_blocks.1.attentions.0.proj_out", "output_blocks.2.1.proj_out"),
             ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "middle_block.1.transformer_blocks.0.attn2.to_v"),
             ("down_blocks.0.downsamplers.0.conv", "input_blocks.2.0.op"),
             ("time_embedding.linear_1", "time_embed.0")]
    mods = [{"part": "unet", "module": d, "ldm": l, "kind": "lora", "rank": 2, "alpha": 1.0} for d, l in pairs]
    tensors = build_file("sd1", mods, seed=3)
    assert any(k.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.") for k in tensors)
    net = read_network_file(save_lora(tmp_path / "ldm.safetensors", tensors))
    before = snapshot(sd1)
    patcher = NetworkPatcher(LoadedModel(sd1))
    report = patcher.apply([ActiveNetwork(net, 1.0, 0.9)])[0]
    try:
        assert report.applied == len(pairs) and report.unmatched == 0
        check_applied(sd1, tensors, mods, lambda m: _kohya_base("sd1", m), 1.0, 0.9, before)
    finally:
        patcher.apply([])


def test_peft_and_old_diffusers_processor_names(sd1, tmp_path):
    mods = [{"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "kind": "lora", "rank": 2, "alpha": 2.0},
            {"part": "te1", "module": "encoder.layers.1.mlp.fc2", "kind": "lora", "rank": 2, "alpha": None}]
    tensors = build_file("sd1", mods, seed=5, naming="peft")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in tensors
    # The older diffusers attention-processor layout for one more module.
    gen = torch.Generator().manual_seed(9)
    proc = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    tensors[f"{proc}.down.weight"] = torch.randn(2, 32, generator=gen) * 0.3
    tensors[f"{proc}.up.weight"] = torch.randn(32, 2, generator=gen) * 0.3
    net = read_network_file(save_lora(tmp_path / "peft.safetensors", tensors))
    before = snapshot(sd1)
    patcher = NetworkPatcher(LoadedModel(sd1))
    report = patcher.apply([ActiveNetwork(net, -0.5, 1.5)])[0]
    try:
        assert report.applied == 3
        def key_of(m):
            from lora_factory import peft_name
            return peft_name(m["part"], m["module"])
        renamed = {k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v
                   for k, v in tensors.items()}
        # no alpha in PEFT files: scale 1 (alpha written only for the first module)
        out_mod = {"part": "unet", "module": "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"}
        renamed["unet." + out_mod["module"] + ".lora_down.weight"] = tensors[f"{proc}.down.weight"]
        renamed["unet." + out_mod["module"] + ".lora_up.weight"] = tensors[f"{proc}.up.weight"]
        check_applied(sd1, renamed, mods + [out_mod], lambda m: key_of(m), -0.5, 1.5, before)
    finally:
        patcher.apply([])


def test_sdxl_kohya_sgm_names_and_both_text_encoders(sdxl, tmp_path):
    """SDXL kohya files use SGM (LDM) UNet names and lora_te1_/lora_te2_; tiny SDXL: input_blocks.3 = down_blocks.1[0]."""
    mods = [{"part": "unet", "module": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
             "ldm": "input_blocks.3.1.transformer_blocks.1.attn2.to_k", "kind": "lora", "rank": 4, "alpha": 4.0},
            {"part": "unet", "module": "up_blocks.0.attentions.1.proj_in", "ldm": "output_blocks.1.1.proj_in",
             "kind": "lora", "rank": 2, "alpha": 1.0},
            {"part": "unet", "module": "add_embedding.linear_1", "ldm": "label_emb.0.0", "kind": "lora", "rank": 2, "alpha": 1.0},
            {"part": "unet", "module": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "kind": "loha", "rank": 2, "alpha": 1.0},
            {"part": "te1", "module": "encoder.layers.0.self_attn.q_proj", "kind": "lora", "rank": 2, "alpha": 1.0},
            {"part": "te2", "module": "encoder.layers.1.mlp.fc1", "kind": "lokr", "rank": 2, "alpha": 1.0}]
    tensors = build_file("sdxl", mods, seed=11)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_mlp_fc1.") for k in tensors)
    net = read_network_file(save_lora(tmp_path / "xl.safetensors", tensors, family="sdxl"))
    assert net.family == "sdxl"
    before = snapshot(sdxl)
    patcher = NetworkPatcher(LoadedModel(sdxl))
    report = patcher.apply([ActiveNetwork(net, 0.8, 1.2)])[0]
    try:
        assert report.applied == len(mods) and report.used
        check_applied(sdxl, tensors, mods, lambda m: _kohya_base("sdxl", m), 0.8, 1.2, before)
    finally:
        patcher.apply([])
    assert all(torch.equal(v, snapshot(sdxl)[k]) for k, v in before.items())


def test_pt_file_dyn_dim_and_zero_multiplier(sd1, tmp_path):
    m = {"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "kind": "lora", "rank": 4, "alpha": 4.0}
    tensors = build_file("sd1", [m], seed=13)
    net = read_network_file(save_lora(tmp_path / "old.pt", tensors))
    before = snapshot(sd1)
    patcher = NetworkPatcher(LoadedModel(sd1))
    patcher.apply([ActiveNetwork(net, 1.0, 1.0, dyn_dim=2)])
    try:
        check_applied(sd1, tensors, [m], lambda mm: _kohya_base("sd1", mm), 1.0, 1.0, before, dyn=2)
        patcher.apply([ActiveNetwork(net, 1.0, 0.0)])
        assert all(torch.equal(v, snapshot(sd1)[k]) for k, v in before.items())
    finally:
        patcher.apply([])


def test_dora_scale_rescales_the_merged_weight(sd1, tmp_path):
    m = {"part": "unet", "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "kind": "lora",
         "rank": 2, "alpha": 1.0, "dora": True}
    tensors = build_file("sd1", [m], seed=17)
    net = read_network_file(save_lora(tmp_path / "dora.safetensors", tensors))
    module = module_of(sd1, "unet", m["module"])
    orig = module.weight.detach().clone()
    base = _kohya_base("sd1", m)
    parts = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".")}
    lora, _ = expected_update({k: v for k, v in parts.items() if k != "dora_scale"}, tuple(orig.shape))
    merged = orig + lora
    column_norm = merged.norm(dim=0, keepdim=True)  # per input channel
    expected = (merged * parts["dora_scale"] / column_norm - orig) * 0.6
    patcher = NetworkPatcher(LoadedModel(sd1))
    patcher.apply([ActiveNetwork(net, 1.0, 0.6)])
    try:
        assert torch.allclose(module.weight, orig + expected, atol=1e-6)
    finally:
        patcher.apply([])
    assert torch.equal(module.weight, orig)


def test_same_set_twice_changes_nothing_and_a_new_set_starts_from_the_originals(sd1, tmp_path):
    net = read_network_file(save_lora(tmp_path / "s.safetensors", simple_lora("sd1"), family="sd1"))
    patcher = NetworkPatcher(LoadedModel(sd1))
    before = snapshot(sd1)
    patcher.apply([ActiveNetwork(net, 1.0, 1.0)])
    once = snapshot(sd1)
    patcher.apply([ActiveNetwork(net, 1.0, 1.0)])  # same signature: no work, no drift
    assert all(torch.equal(once[k], v) for k, v in snapshot(sd1).items())
    patcher.apply([ActiveNetwork(net, 0.5, 0.5)])
    half = snapshot(sd1)
    patcher.apply([ActiveNetwork(net, 1.0, 1.0)])
    assert all(torch.equal(once[k], v) for k, v in snapshot(sd1).items())
    assert any(not torch.equal(once[k], half[k]) for k in once)
    patcher.apply([])
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd1).items())
    assert not patcher.state.backup  # backups released once restored


def test_lora_for_another_base_model_is_skipped_with_a_reason(sd1, tmp_path):
    xl = read_network_file(save_lora(tmp_path / "xl.safetensors", simple_lora("sdxl"), family="sdxl"))
    report = NetworkPatcher(LoadedModel(sd1)).apply([ActiveNetwork(xl, 1.0, 1.0, label="xl")])[0]
    assert not report.used and "made for SDXL" in report.skipped_reason and "SD 1.x" in report.skipped_reason
    # No metadata: nothing matches by name/shape -> a reason naming that, still no change.
    unet_only = {k: v for k, v in simple_lora("sdxl").items() if k.startswith("lora_unet_")}
    bare = read_network_file(save_lora(tmp_path / "bare.safetensors", unet_only))
    assert bare.family is None
    before = snapshot(sd1)
    report = NetworkPatcher(LoadedModel(sd1)).apply([ActiveNetwork(bare, 1.0, 1.0, label="bare")])[0]
    assert not report.used and ("other shapes" in report.skipped_reason or "matches a layer" in report.skipped_reason)
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd1).items())
    NetworkPatcher(LoadedModel(sd1)).apply([])


def test_damaged_and_foreign_files_raise_user_errors(tmp_path):
    good = save_lora(tmp_path / "good.safetensors", simple_lora("sd1"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="broken.safetensors"):
        read_network_file(broken)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="garbage.pt"):
        read_network_file(garbage)
    from safetensors.torch import save_file
    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="none of its 1 tensors"):
        read_network_file(tmp_path / "other.safetensors")


def test_low_rank_factors_go_into_the_weight_in_every_layout_and_dtype():
    """LoRA factor pairs are multiplied straight into the weight (no full-size update): the same numbers as
    adding `up @ down`, for contiguous and channels_last conv weights, and summed in float32 for bfloat16."""
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(8, 3, generator=gen), torch.randn(3, 4 * 3 * 3, generator=gen)
    full = torch.randn(8, 4, 3, 3, generator=gen)
    base = torch.randn(8, 4, 3, 3, generator=gen)
    want = base + (up @ down).reshape(base.shape) + full
    for layout in (torch.contiguous_format, torch.channels_last):
        param = torch.nn.Parameter(base.clone().to(memory_format=layout), requires_grad=False)
        add_updates(param, [(up, down), full])
        assert torch.allclose(param, want, atol=1e-5) and param.is_contiguous(memory_format=layout)
    half = torch.nn.Parameter(base.to(torch.bfloat16), requires_grad=False)
    add_updates(half, [(up, down), full])
    assert half.dtype == torch.bfloat16
    exact = base.to(torch.bfloat16).float() + (want - base)
    assert ((half.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # one rounding to bfloat16


def test_key_layouts_parse():
    assert split_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")[:3] == \
        ("unet", "down_blocks_0_attentions_0_proj_in", "lora_down.weight")
    assert split_key("lora_te2_text_model_encoder_layers_3_mlp_fc1.alpha")[:3] == \
        ("te2", "text_model_encoder_layers_3_mlp_fc1", "alpha")
    assert split_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a")[:2] == \
        ("te1", "text_model_encoder_layers_0_self_attn_q_proj")
    assert split_key("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight")[:3] == \
        ("te2", "text_model_encoder_layers_0_self_attn_k_proj", "lora_down.weight")
    assert split_key("text_encoder.encoder.layers.0.self_attn.k_proj.lora_B.weight")[:2] == \
        ("te1", "text_model_encoder_layers_0_self_attn_k_proj")
    assert split_key("unet.mid_block.attentions.0.proj_in.lora.up.weight")[:3] == \
        ("unet", "mid_block_attentions_0_proj_in", "lora_up.weight")
    assert split_key("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight")[:3] == \
        ("unet", "up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "lora_down.weight")
    assert split_key("lora_unet_input_blocks_4_1_proj_in.w_norm")[2] == "w_norm"
    assert split_key("bundle_emb.x.string_to_param.*") is None


def _meta_model(unet_config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
    return SimpleNamespace(unet=unet, text_encoders=[], spec=SimpleNamespace(unet_config=unet_config))


SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}


@pytest.mark.parametrize("config,pairs", [
    (SD15_UNET, [("input_blocks_1_1_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
                 ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
                 ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
                 ("middle_block_1_proj_out", "mid_block.attentions.0.proj_out"),
                 ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
                 ("output_blocks_11_1_transformer_blocks_0_ff_net_2", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
                 ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv")]),
    (SDXL_UNET, [("input_blocks_4_1_transformer_blocks_1_attn2_to_k", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
                 ("input_blocks_8_1_transformer_blocks_9_attn1_to_out_0", "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0"),
                 ("middle_block_1_transformer_blocks_9_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj"),
                 ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
                 ("output_blocks_5_1_proj_in", "up_blocks.1.attentions.2.proj_in"),
                 ("label_emb_0_0", "add_embedding.linear_1")]),
], ids=["sd15", "sdxl"])
def test_full_size_ldm_names_map_to_diffusers_modules(config, pairs):
    model = _meta_model(config)
    table = target_table(model)
    for ldm, diffusers_name in pairs:
        assert table[("unet", ldm)] is model.unet.get_submodule(diffusers_name), ldm
        assert table[("unet", diffusers_name.replace(".", "_"))] is model.unet.get_submodule(diffusers_name)
