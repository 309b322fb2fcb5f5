"""FLUX.1 / SD3 text encoders: what a separate part file is, loading CLIP-L/CLIP-G/T5 (also float8), the T5
tokenizer (downloaded once, offline afterwards), and the conditioning (shapes, emphasis, schedules, padding)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from backend.core.errors import JobInterrupted, UserError
from backend.engine.conditioning import stack_padded
from backend.engine.families import text_encoders as te
from backend.engine.families.flow_conditioning import FlowConditioner
from backend.engine.families.t5_tokenizer import T5_TOKENIZER_URL, t5_tokenizer, t5_tokenizer_path
from backend.engine.state_dict_io import read_state_dict
from backend.engine.tokenizer import clip_tokenizer
from flow_factory import T5_TINY, build_t5, train_t5_tokenizer, write_clip_g, write_clip_l, write_t5

IDS = torch.tensor([[5, 9, 33, 17, 1, 0, 0]])
CLIP_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny part files as people keep them, with the float32 modules they were made from."""
    d = tmp_path_factory.mktemp("parts")
    refs = {
        "t5": write_t5(d / "t5xxl_fp16.safetensors", torch.float16),
        "clip_l": write_clip_l(d / "clip_l.safetensors"),
        "clip_g": write_clip_g(d / "clip_g.safetensors"),
    }
    write_t5(d / "t5xxl_fp32.safetensors")
    write_t5(d / "t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn)
    write_t5(d / "t5xxl_fp8_e4m3fn_scaled.safetensors", torch.float8_e4m3fn, scaled=True)
    write_t5(d / "comfy_t5.safetensors", prefix="text_encoders.t5xxl.transformer.")
    write_clip_l(d / "comfy_clip_l.safetensors", prefix="text_encoders.clip_l.transformer.")
    write_clip_l(d / "sd3_clip_l.safetensors", with_projection=True)
    return d, refs


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    train_t5_tokenizer(d)
    return d


def _sd(parts, name):
    return read_state_dict(parts[0] / name)


# -- classify_part -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [
    ("t5xxl_fp16.safetensors", "t5xxl"), ("t5xxl_fp8_e4m3fn.safetensors", "t5xxl"),
    ("t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl"), ("comfy_t5.safetensors", "t5xxl"),
    ("clip_l.safetensors", "clip_l"), ("comfy_clip_l.safetensors", "clip_l"), ("clip_g.safetensors", "clip_g"),
])
def test_classify_part_files(parts, name, kind):
    assert te.classify_part(_sd(parts, name)) == kind


def _meta(**shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_classify_part_by_width_not_projection():
    """Full-size shapes (meta tensors): SD3's clip_l has a projection and is still CLIP-L by its width 768."""
    layer = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    clip_l = _meta(**{"text_model.embeddings.token_embedding.weight": (49408, 768), layer: (768, 768),
                      "text_projection.weight": (768, 768)})
    clip_g = _meta(**{"text_model.embeddings.token_embedding.weight": (49408, 1280), layer: (1280, 1280),
                      "text_projection.weight": (1280, 1280)})
    assert te.classify_part(clip_l) == "clip_l"
    assert te.classify_part(clip_g) == "clip_g"
    prefixed = {"text_encoders.clip_g.transformer." + k: v for k, v in clip_g.items()}
    assert te.classify_part(prefixed) == "clip_g"


def test_classify_part_vae():
    ldm = _meta(**{"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
                   "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3), "encoder.conv_in.weight": (128, 3, 3, 3)})
    assert te.classify_part(ldm) == "vae"
    assert te.classify_part({"first_stage_model." + k: v for k, v in ldm.items()}) == "vae"
    assert te.classify_part({"vae." + k: v for k, v in ldm.items()}) == "vae"
    diffusers = _meta(**{"encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
                         "decoder.up_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3)})
    assert te.classify_part(diffusers) == "vae"


def test_classify_part_refuses_other_files_clearly():
    lora = _meta(**{"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)})
    with pytest.raises(UserError, match=r"my_lora\.safetensors is not a VAE, CLIP-L, CLIP-G or T5-XXL.*LoRA"):
        te.classify_part(lora, "my_lora.safetensors")
    flux = _meta(**{"double_blocks.0.img_attn.qkv.weight": (9216, 3072),
                    "single_blocks.0.linear1.weight": (21504, 3072)})
    with pytest.raises(UserError, match="Flux model"):
        te.classify_part(flux, "flux1-dev.safetensors")


# -- loaders -----------------------------------------------------------------------------------------------------
def test_load_clip_l_and_g_forward_as_transformers(parts):
    _, refs = parts
    clip_l = te.load_clip_l(_sd(parts, "clip_l.safetensors"), dtype=torch.float32, device="cpu")
    want, got = refs["clip_l"](input_ids=CLIP_IDS), clip_l(input_ids=CLIP_IDS)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    clip_g = te.load_clip_g(_sd(parts, "clip_g.safetensors"), torch.float32, "cpu")  # positional, as the contract
    want, got = refs["clip_g"](input_ids=CLIP_IDS), clip_g(input_ids=CLIP_IDS)
    assert torch.equal(got.text_embeds, want.text_embeds)
    assert clip_g.config.hidden_act == "gelu" and clip_l.config.hidden_act == "quick_gelu"
    # ComfyUI's prefix and SD3's projection in the CLIP-L file are both taken
    for name in ("comfy_clip_l.safetensors", "sd3_clip_l.safetensors"):
        other = te.load_clip_l(_sd(parts, name), dtype=torch.float32, device="cpu")
        assert torch.equal(other(input_ids=CLIP_IDS).pooler_output, refs["clip_l"](input_ids=CLIP_IDS).pooler_output)


def test_load_t5_config_from_shapes_and_forward(parts):
    t5 = te.load_t5xxl(_sd(parts, "t5xxl_fp32.safetensors"), dtype=torch.float32, device="cpu")
    for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size", "relative_attention_num_buckets"):
        assert getattr(t5.config, key) == T5_TINY[key], key
    assert t5.config.is_gated_act
    want = build_t5()(input_ids=IDS).last_hidden_state
    assert torch.equal(t5(input_ids=IDS).last_hidden_state, want)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    comfy = te.load_t5xxl(_sd(parts, "comfy_t5.safetensors"), dtype=torch.float32, device="cpu")
    assert torch.equal(comfy(input_ids=IDS).last_hidden_state, want)


def test_t5_never_computes_in_float16(parts):
    t5 = te.load_t5xxl(_sd(parts, "t5xxl_fp16.safetensors"), dtype=torch.float16, device="cpu")
    assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}
    out = t5(input_ids=IDS).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _dequantized_reference(sd: dict) -> torch.nn.Module:
    """The tiny T5 with the file's float8 values (times their scales) as float32 weights."""
    sd = te.part_state_dict(sd)
    model = copy.deepcopy(build_t5())
    with torch.no_grad():
        for key, param in model.state_dict().items():
            if key == "encoder.embed_tokens.weight":
                continue
            value = sd[key].float()
            scale = sd.get(key[: -len("weight")] + "scale_weight")
            param.copy_(value * scale.float() if scale is not None else value)
    return model


@pytest.mark.parametrize("name", ["t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"])
def test_float8_t5_stays_float8_and_computes_as_its_dequantized_weights(parts, name):
    sd = _sd(parts, name)
    t5 = te.load_t5xxl(sd, dtype=torch.float32, device="cpu")
    matrices = [p for n, p in t5.named_parameters() if p.ndim == 2]
    assert all(p.dtype == torch.float8_e4m3fn for p in matrices)  # the big tensors stay float8 in memory
    got = t5(input_ids=IDS).last_hidden_state
    assert got.dtype == torch.float32
    assert all(p.dtype == torch.float8_e4m3fn for p in matrices)  # put back after the forward
    assert torch.allclose(got, _dequantized_reference(sd)(input_ids=IDS).last_hidden_state, atol=1e-5)
    want = build_t5()(input_ids=IDS).last_hidden_state
    other = build_t5(seed=5)(input_ids=IDS).last_hidden_state
    error = (got - want).norm() / want.norm()
    assert error < 0.4 and error < 0.5 * (other - want).norm() / want.norm()  # close to the fp32 T5


def test_t5_stored_in_float8_on_request(parts):
    t5 = te.load_t5xxl(_sd(parts, "t5xxl_fp32.safetensors"), dtype=torch.float8_e4m3fn, device="cpu")
    assert t5.shared.weight.dtype == torch.float8_e4m3fn
    assert t5.encoder.final_layer_norm.weight.dtype == torch.bfloat16
    want = build_t5()(input_ids=IDS).last_hidden_state
    got = t5(input_ids=IDS).last_hidden_state.float()
    assert (got - want).norm() / want.norm() < 0.3


def test_damaged_t5_is_a_user_error(parts):
    sd = _sd(parts, "t5xxl_fp32.safetensors")
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(UserError, match="missing 1 tensors: encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        te.load_t5xxl(sd, dtype=torch.float32, device="cpu")


# -- T5 tokenizer --------------------------------------------------------------------------------------------------
def _no_network(monkeypatch):
    import backend.downloads as downloads

    def refuse(*_args, **_kwargs):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(downloads, "download_file", refuse)
    monkeypatch.setattr(downloads, "network_available", refuse)


def test_t5_tokenizer_offline_without_file_names_file_folder_and_url(tmp_path, monkeypatch):
    import backend.downloads as downloads
    monkeypatch.setattr(downloads, "network_available", lambda url, timeout=3.0: False)
    monkeypatch.setattr(downloads, "download_file", lambda *a, **k: pytest.fail("no download offline"))
    folder = tmp_path / "text_encoder" / "t5-tokenizer"
    with pytest.raises(UserError) as info:
        t5_tokenizer(tmp_path)
    message = info.value.message
    assert "spiece.model" in message and str(folder) in message and T5_TOKENIZER_URL in message
    assert info.value.status == 503
    _no_network(monkeypatch)
    with pytest.raises(UserError, match="downloads are off"):
        t5_tokenizer(tmp_path, allow_download=False)


def test_t5_tokenizer_downloads_once_with_progress(tmp_path, monkeypatch, models_dir):
    import backend.downloads as downloads
    calls = []

    def fake_download(url, dest, progress=None):
        calls.append((url, dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(t5_tokenizer_path(models_dir).read_bytes())
        if progress:
            progress(1, 1)
        return dest
    monkeypatch.setattr(downloads, "network_available", lambda url, timeout=3.0: True)
    monkeypatch.setattr(downloads, "download_file", fake_download)
    seen = []
    tok = t5_tokenizer(tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert calls == [(T5_TOKENIZER_URL, t5_tokenizer_path(tmp_path))] and seen == [(1, 1)]
    _no_network(monkeypatch)
    assert t5_tokenizer(tmp_path)("a cat")["input_ids"] == tok("a cat")["input_ids"]


def test_t5_tokenizer_from_the_file_matches_sentencepiece_without_network(models_dir, monkeypatch):
    import sentencepiece as spm
    _no_network(monkeypatch)
    tok = t5_tokenizer(models_dir)
    assert t5_tokenizer(models_dir) is tok  # once per process
    sp = spm.SentencePieceProcessor(model_file=str(t5_tokenizer_path(models_dir)))
    for text in ("a photo of a cat", "  masterpiece,   best quality ", "Ｆｕｌｌ width café!", "(a cat:1.2), 4k"):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok("a cat")["input_ids"][-1] == 1 and tok.pad_token_id == 0
    assert len(tok) == sp.get_piece_size() + 100  # the <extra_id_N> sentinels, as T5's own


def test_t5_tokenizer_refuses_a_file_that_is_not_one(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    path = t5_tokenizer_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x0a\x05hello\xff\xff")
    with pytest.raises(UserError, match=r"spiece\.model.*huggingface"):
        t5_tokenizer(tmp_path)


# -- conditioning --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders(parts, models_dir):
    return {
        "clip_l": te.load_clip_l(_sd(parts, "clip_l.safetensors"), dtype=torch.float32, device="cpu"),
        "clip_g": te.load_clip_g(_sd(parts, "clip_g.safetensors"), dtype=torch.float32, device="cpu"),
        "t5xxl": te.load_t5xxl(_sd(parts, "t5xxl_fp32.safetensors"), dtype=torch.float32, device="cpu"),
    }, {"clip_l": clip_tokenizer("clip_l"), "clip_g": clip_tokenizer("clip_g"), "t5xxl": t5_tokenizer(models_dir)}


def _model(family, encoders, names, width=None):
    modules, tokenizers = encoders
    transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=width)) if width else None
    return SimpleNamespace(family=family, transformer=transformer, text_encoders={n: modules[n] for n in names},
                           tokenizers={n: tokenizers[n] for n in names})


D_T5 = T5_TINY["d_model"]


def test_flux_conditioning_shapes_and_parts(encoders):
    model = _model("flux", encoders, ("clip_l", "t5xxl"))
    cond = FlowConditioner(model, "cpu").encode("a photo of a cat")
    assert cond.crossattn.shape == (256, D_T5) and cond.pooled.shape == (32,)
    assert cond.crossattn.dtype == torch.float32
    # context = T5's last hidden state of the prompt's tokens, </s>, <pad>...
    tokens = model.tokenizers["t5xxl"]("a photo of a cat", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokens + [1] + [0] * (255 - len(tokens))])
    assert torch.allclose(cond.crossattn, model.text_encoders["t5xxl"](input_ids=ids).last_hidden_state[0], atol=1e-6)
    # pooled = CLIP-L's pooled output of its first chunk
    clip_ids = model.tokenizers["clip_l"]("a photo of a cat", add_special_tokens=False)["input_ids"]
    clip_ids = torch.tensor([[49406] + clip_ids + [49407] * (76 - len(clip_ids))])
    assert torch.allclose(cond.pooled, model.text_encoders["clip_l"](input_ids=clip_ids).pooler_output[0], atol=1e-6)


def test_flux_long_prompt_and_break_and_padding(encoders):
    model = _model("flux", encoders, ("clip_l", "t5xxl"))
    conditioner = FlowConditioner(model, "cpu")
    long = ", ".join(["a photo of a cat sitting on a red chair"] * 40)
    assert conditioner.encode(long).crossattn.shape[0] % 256 == 0 and conditioner.encode(long).crossattn.shape[0] > 256
    broken = conditioner.encode("a cat BREAK a dog")
    assert broken.crossattn.shape == (512, D_T5)
    empty = conditioner.empty_chunk()
    assert empty.shape == (256, D_T5)
    stacked, pooled = stack_padded([conditioner.encode(long), conditioner.encode("a dog", True)],
                                   conditioner.encode(long).crossattn.shape[0], empty)
    assert stacked.shape[0] == 2 and pooled.shape == (2, 32)
    assert torch.equal(stacked[1, 256:512], empty)


def test_sd3_conditioning_shapes_and_layout(encoders):
    width = D_T5  # 96: CLIP-L 32 ++ CLIP-G 32, zero-padded to 96
    model = _model("sd3", encoders, ("clip_l", "clip_g", "t5xxl"), width)
    conditioner = FlowConditioner(model, "cpu")
    cond = conditioner.encode("a photo of a cat")
    assert cond.crossattn.shape == (154, width) and cond.pooled.shape == (32 + 32,)
    # CLIP-L ++ CLIP-G penultimate states, zero-padded; then T5
    clip_ids = model.tokenizers["clip_l"]("a photo of a cat", add_special_tokens=False)["input_ids"]
    ids_l = torch.tensor([[49406] + clip_ids + [49407] * (76 - len(clip_ids))])
    ids_g = torch.tensor([[49406] + clip_ids + [49407] + [0] * (75 - len(clip_ids))])
    out_l = model.text_encoders["clip_l"](input_ids=ids_l, output_hidden_states=True)
    out_g = model.text_encoders["clip_g"](input_ids=ids_g, output_hidden_states=True)
    assert torch.allclose(cond.crossattn[:77, :32], out_l.hidden_states[-2][0], atol=1e-6)
    assert torch.allclose(cond.crossattn[:77, 32:64], out_g.hidden_states[-2][0], atol=1e-6)
    assert torch.count_nonzero(cond.crossattn[:77, 64:]) == 0
    assert torch.allclose(cond.pooled, torch.cat([out_l.pooler_output[0], out_g.text_embeds[0]]), atol=1e-6)
    t5_tokens = model.tokenizers["t5xxl"]("a photo of a cat", add_special_tokens=False)["input_ids"]
    t5_ids = torch.tensor([t5_tokens + [1] + [0] * (76 - len(t5_tokens))])
    assert torch.allclose(cond.crossattn[77:], model.text_encoders["t5xxl"](input_ids=t5_ids).last_hidden_state[0],
                          atol=1e-6)
    # a long prompt: as many T5 blocks as CLIP chunks; the empty chunk pads it
    long = ", ".join(["a photo of a cat sitting on a red chair"] * 12)
    assert conditioner.encode(long).crossattn.shape[0] % 154 == 0 and conditioner.encode(long).crossattn.shape[0] > 154
    assert conditioner.empty_chunk().shape == (154, width)


def test_t5_of_another_width_is_refused(encoders):
    model = _model("sd3", encoders, ("clip_l", "clip_g", "t5xxl"), 4096)
    with pytest.raises(UserError, match="width 96.*4096"):
        FlowConditioner(model, "cpu")


def test_sd3_without_t5_uses_zeros(encoders):
    model = _model("sd3", encoders, ("clip_l", "clip_g"), D_T5)
    cond = FlowConditioner(model, "cpu").encode("a photo of a cat")
    assert cond.crossattn.shape == (154, D_T5)
    assert torch.count_nonzero(cond.crossattn[77:]) == 0 and torch.count_nonzero(cond.crossattn[:77]) > 0


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_emphasis_changes_the_context_as_expected(encoders, family):
    names = ("clip_l", "t5xxl") if family == "flux" else ("clip_l", "clip_g", "t5xxl")
    model = _model(family, encoders, names, D_T5 if family == "sd3" else None)
    plain = FlowConditioner(model, "cpu", emphasis="No norm").encode("a cat on a chair")
    weighted = FlowConditioner(model, "cpu", emphasis="No norm").encode("a cat on (a chair:1.5)")
    t5_rows = slice(0, 256) if family == "flux" else slice(77, 154)
    changed = ~torch.isclose(weighted.crossattn[t5_rows], plain.crossattn[t5_rows], atol=1e-6).all(dim=1)
    n_a_cat_on = len(model.tokenizers["t5xxl"]("a cat on", add_special_tokens=False)["input_ids"])
    n_chair = len(model.tokenizers["t5xxl"]("a chair", add_special_tokens=False)["input_ids"])
    assert not changed[:n_a_cat_on].any() and changed[n_a_cat_on:n_a_cat_on + n_chair].all()
    assert torch.allclose(weighted.crossattn[t5_rows][n_a_cat_on:n_a_cat_on + n_chair],
                          1.5 * plain.crossattn[t5_rows][n_a_cat_on:n_a_cat_on + n_chair], atol=1e-5)
    # "Original" restores the mean; "Ignore" parses and does not apply; "None" reads the brackets as text
    original = FlowConditioner(model, "cpu").encode("a cat on (a chair:1.5)")
    assert torch.isclose(original.crossattn[t5_rows].mean(), plain.crossattn[t5_rows].mean(), atol=1e-5)
    assert not torch.allclose(original.crossattn, plain.crossattn)
    ignored = FlowConditioner(model, "cpu", emphasis="Ignore").encode("a cat on (a chair:1.5)")
    assert torch.allclose(ignored.crossattn, plain.crossattn, atol=1e-6)
    as_text = FlowConditioner(model, "cpu", emphasis="None").encode("a cat on (a chair:1.5)")
    assert not torch.allclose(as_text.crossattn, plain.crossattn)


def test_schedules_switch_and_tags_are_stripped(encoders):
    model = _model("flux", encoders, ("clip_l", "t5xxl"))
    conditioner = FlowConditioner(model, "cpu")
    scheduled = conditioner.schedules(["a [cat:dog:0.5] <lora:thing:0.8>"], steps=10, is_negative=False)
    cat, dog = conditioner.encode("a cat"), conditioner.encode("a dog")
    # A1111: [cat:dog:0.5] of 10 steps is "cat" up to step 5 (0-based, inclusive), then "dog"
    assert torch.equal(scheduled.at(0)[0].crossattn, cat.crossattn)
    assert torch.equal(scheduled.at(5)[0].crossattn, cat.crossattn)
    assert torch.equal(scheduled.at(6)[0].crossattn, dog.crossattn)
    assert torch.equal(scheduled.at(9)[0].pooled, dog.pooled)
    assert not torch.equal(cat.crossattn, dog.crossattn)
    assert torch.equal(conditioner.encode("a cat <lora:x:1>").crossattn, cat.crossattn)


def test_interrupt_between_passes(encoders):
    model = _model("flux", encoders, ("clip_l", "t5xxl"))
    calls = []

    def stop_on_second_check():
        calls.append(1)
        return len(calls) >= 2
    with pytest.raises(JobInterrupted):
        FlowConditioner(model, "cpu", should_stop=stop_on_second_check).encode("a cat BREAK a dog")


def test_float8_t5_in_the_conditioner(parts, encoders):
    modules, tokenizers = encoders
    fp8 = te.load_t5xxl(_sd(parts, "t5xxl_fp8_e4m3fn.safetensors"), dtype=torch.bfloat16, device="cpu")
    model = SimpleNamespace(family="flux", transformer=None, text_encoders={"clip_l": modules["clip_l"], "t5xxl": fp8},
                            tokenizers=tokenizers)
    cond = FlowConditioner(model, "cpu").encode("a photo of a cat")
    assert cond.crossattn.dtype == torch.float32 and torch.isfinite(cond.crossattn).all()
    assert cond.crossattn.shape == (256, D_T5)


class _OneEmbedding:
    """A stand-in for `backend.embeddings.JobEmbeddings` with one embedding of two vectors per encoder."""

    def __init__(self, tokenizer, name: str, widths: list[int]):
        self.ids = tokenizer([name], add_special_tokens=False)["input_ids"][0]
        self.embedding = SimpleNamespace(count=2, name=name)
        self.vectors_by_encoder = [torch.full((2, w), 0.5) for w in widths]
        self.asked: list[int] = []

    def __bool__(self):
        return True

    def find_at(self, tokens, position):
        if tokens[position:position + len(self.ids)] == self.ids:
            return self.embedding, len(self.ids)
        return None

    def vectors(self, embedding, index):
        self.asked.append(index)
        return self.vectors_by_encoder[index]


def test_sd3_textual_inversion_on_the_clip_encoders(encoders):
    model = _model("sd3", encoders, ("clip_l", "clip_g", "t5xxl"), D_T5)
    embeddings = _OneEmbedding(model.tokenizers["clip_l"], "zqxemb", [32, 32])
    plain = FlowConditioner(model, "cpu").encode("a zqxemb cat")
    with_ti = FlowConditioner(model, "cpu", embeddings=embeddings).encode("a zqxemb cat")
    assert sorted(set(embeddings.asked)) == [0, 1]  # CLIP-L's and CLIP-G's vectors
    assert not torch.allclose(with_ti.crossattn[:77, :64], plain.crossattn[:77, :64])
    assert torch.allclose(with_ti.crossattn[77:], plain.crossattn[77:])  # T5 has no embeddings


def test_float8_hooks_only_where_float8_is(parts):
    fp8 = te.load_t5xxl(_sd(parts, "t5xxl_fp8_e4m3fn.safetensors"), dtype=torch.float32, device="cpu")
    assert fp8.encoder.embed_tokens._forward_pre_hooks and all(b._forward_pre_hooks for b in fp8.encoder.block)
    plain = te.load_t5xxl(_sd(parts, "t5xxl_fp32.safetensors"), dtype=torch.float32, device="cpu")
    assert not any(m._forward_pre_hooks for m in plain.modules())
