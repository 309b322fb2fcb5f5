"""Textual inversion: every file format reads, an embedding's name in the prompt puts its vectors into the
text encoder (with emphasis), SDXL gets clip_l/clip_g each to its encoder, and misfits only warn."""
from __future__ import annotations

import hashlib

import pytest
import torch

from backend.engine.conditioning import TextConditioner, tokenize_prompt
from backend.embeddings import EmbeddingDatabase, checkpoint_text_dims, read_embedding_info
from backend.engine.embeddings import EmbeddingVectors, JobEmbeddings, read_embedding_file
from backend.core.errors import UserError
from lora_factory import save_embedding

torch.set_num_threads(1)
CPU = torch.device("cpu")




def vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def capture_embeddings_output(encoder):
    """Record the output of the encoder's embeddings layer (token + position embeddings), which comes
    after the token embeddings the conditioner replaced."""
    seen = []
    handle = getattr(encoder, "text_model", encoder).embeddings.register_forward_hook(
        lambda _m, _i, out: seen.append(out.detach().clone()))
    return seen, handle


def test_file_formats(tmp_path):
    v = vectors(3, 32, 1)
    pt = read_embedding_file(save_embedding(tmp_path / "a1111.pt", v))
    assert pt.name == "a1111" and pt.count == 3 and pt.shape == 32 and pt.step == 1500
    assert pt.describe() == {"step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "tiny", "shape": 32, "vectors": 3}
    assert torch.equal(pt.vectors[0], v)
    st = read_embedding_file(save_embedding(tmp_path / "plain.safetensors", v))
    assert torch.equal(st.vectors[0], v) and st.step is None
    single = read_embedding_file(save_embedding(tmp_path / "diffusers.bin", v[0]))  # {"<token>": [dim]}
    assert single.count == 1 and torch.equal(single.vectors[0][0], v[0])
    xl = read_embedding_file(save_embedding(tmp_path / "xl.safetensors", {"clip_l": vectors(2, 32, 2), "clip_g": vectors(2, 64, 3)}))
    assert xl.dims == [32, 64] and xl.shape == 96 and xl.count == 2
    assert xl.fits([32, 64]) and not xl.fits([32]) and pt.fits([32]) and not pt.fits([32, 64])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="junk.pt"):
        read_embedding_file(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(UserError, match="not a textual-inversion file"):
        read_embedding_file(tmp_path / "two.pt")


def test_listing_reads_the_same_embeddings_without_their_vectors(tmp_path):
    # The app lists embeddings from the files' headers (no torch); it must see what the backend reads.
    files = [save_embedding(tmp_path / "a1111.pt", vectors(3, 32, 1)),
             save_embedding(tmp_path / "plain.safetensors", vectors(2, 32, 4)),
             save_embedding(tmp_path / "diffusers.bin", vectors(1, 32, 6)[0]),
             save_embedding(tmp_path / "xl.safetensors", {"clip_l": vectors(2, 32, 2), "clip_g": vectors(2, 64, 3)})]
    for path in files:
        full, listed = read_embedding_file(path), read_embedding_info(path)
        assert listed.describe() == full.describe() and listed.dims == full.dims, path.name
        assert all(not isinstance(v, torch.Tensor) for v in listed.vectors)
    assert read_embedding_info(files[0]).describe()["step"] == 1500
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.pt")
    with pytest.raises(UserError, match="not a textual-inversion file"):
        read_embedding_info(tmp_path / "two.pt")
    torch.save({"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, tmp_path / "ints.pt")
    with pytest.raises(UserError, match="not a float tensor"):
        read_embedding_info(tmp_path / "ints.pt")


def test_checkpoint_text_dims(tiny_models):
    assert checkpoint_text_dims(tiny_models["sd1"]) == [32]
    assert checkpoint_text_dims(tiny_models["sdxl"]) == [32, 64]
    assert checkpoint_text_dims(tiny_models["sd1_ckpt"]) == [32]


def test_embedding_replaces_its_name_with_its_vectors(sd1, tmp_path):
    v = vectors(2, 32, 5)
    path = save_embedding(tmp_path / "emb" / "mystyle.pt", v)
    db = EmbeddingVectors(tmp_path / "emb")
    params, warnings = {}, []
    job = db.for_job(sd1, params, warnings)
    plain = TextConditioner(sd1, CPU).encode("a mystyle cat").crossattn
    cond = TextConditioner(sd1, CPU, embeddings=job)
    encoder = sd1.text_encoders[0]
    seen, handle = capture_embeddings_output(encoder)
    try:
        with_emb = cond.encode("a mystyle cat").crossattn
    finally:
        handle.remove()
    assert not torch.allclose(plain, with_emb)
    # The embeddings layer output = token embedding + position embedding: at the two placeholders
    # (after BOS and "a") the token part is exactly the file's vectors.
    tm = getattr(encoder, "text_model", encoder)
    positions = tm.embeddings.position_embedding.weight[:77]
    token_part = seen[0][0] - positions
    assert torch.allclose(token_part[2:4], v, atol=1e-6)
    cat_id = sd1.tokenizers[0]("cat", add_special_tokens=False)["input_ids"][0]
    assert torch.allclose(token_part[4], tm.embeddings.token_embedding.weight[cat_id], atol=1e-6)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert params["TI hashes"] == f"mystyle: {sha[:12]}"
    assert warnings == []


def test_emphasis_applies_to_embedding_vectors(sd1, tmp_path):
    save_embedding(tmp_path / "emb" / "mystyle.safetensors", vectors(3, 32, 6))
    job = EmbeddingVectors(tmp_path / "emb").for_job(sd1, {}, [])
    chunks, count = tokenize_prompt(sd1.tokenizers[0], "a (mystyle:1.5) cat", 49407, job)
    chunk = chunks[0]
    assert count == 5 and [offset for offset, _ in chunk.fixes] == [1]
    assert chunk.tokens[2:5] == [0, 0, 0]  # placeholders (after BOS and "a")
    assert chunk.multipliers[2:5] == [1.5, 1.5, 1.5] and chunk.multipliers[1] == 1.0
    cond = TextConditioner(sd1, CPU, embeddings=job)
    assert not torch.allclose(cond.encode("a (mystyle:1.5) cat").crossattn, cond.encode("a mystyle cat").crossattn)


def test_embedding_that_would_cross_a_chunk_boundary_moves_to_the_next_chunk(sd1, tmp_path):
    save_embedding(tmp_path / "emb" / "wide.pt", vectors(4, 32, 7))
    job = EmbeddingVectors(tmp_path / "emb").for_job(sd1, {}, [])
    prompt = " ".join(["cat"] * 73) + " wide"
    chunks, _ = tokenize_prompt(sd1.tokenizers[0], prompt, 49407, job)
    assert len(chunks) == 2 and chunks[0].fixes == [] and [o for o, _ in chunks[1].fixes] == [0]
    cond = TextConditioner(sd1, CPU, embeddings=job).encode(prompt)
    assert cond.crossattn.shape[0] == 154


def test_sdxl_embedding_gives_each_encoder_its_own_vectors(sdxl, tmp_path):
    l, g = vectors(2, 32, 8), vectors(2, 64, 9)
    save_embedding(tmp_path / "emb" / "xlstyle.safetensors", {"clip_l": l, "clip_g": g})
    save_embedding(tmp_path / "emb" / "sd1only.pt", vectors(1, 32, 10))
    params, warnings = {}, []
    job = EmbeddingVectors(tmp_path / "emb").for_job(sdxl, params, warnings)
    seen = []
    handles = [getattr(enc, "text_model", enc).embeddings.register_forward_hook(
        lambda _m, _i, out, k=k: seen.append((k, out.detach().clone()))) for k, enc in enumerate(sdxl.text_encoders)]
    try:
        TextConditioner(sdxl, CPU, embeddings=job).encode("xlstyle house")
    finally:
        for h in handles:
            h.remove()
    for k, expected in ((0, l), (1, g)):
        tm = getattr(sdxl.text_encoders[k], "text_model", sdxl.text_encoders[k])
        out = next(o for kk, o in seen if kk == k)[0] - tm.embeddings.position_embedding.weight[:77]
        assert torch.allclose(out[1:3], expected, atol=1e-6)
    assert params["TI hashes"].startswith("xlstyle: ")
    # The SD 1.x embedding does not fit SDXL: a warning, and the words stay words.
    plain = TextConditioner(sdxl, CPU).encode("sd1only house").crossattn
    got = TextConditioner(sdxl, CPU, embeddings=job).encode("sd1only house").crossattn
    assert torch.equal(plain, got)
    assert len(warnings) == 1 and "sd1only" in warnings[0] and "32" in warnings[0] and "SDXL" in warnings[0]
    assert "sd1only" not in params["TI hashes"]


def test_database_rereads_changed_files_and_reports_bad_ones(sd1, tmp_path):
    folder = tmp_path / "emb"
    save_embedding(folder / "sub" / "one.pt", vectors(1, 32, 11))
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert set(db.loaded) == {"one"}
    first = db.loaded["one"]
    db.refresh()
    assert db.loaded["one"] is first  # unchanged: not read again
    (folder / "broken.safetensors").write_bytes(b"12345678")
    save_embedding(folder / "wrong.pt", vectors(1, 48, 12))
    db.refresh()
    assert "broken" in db.errors and "broken.safetensors" in db.errors["broken"]
    loaded, skipped = db.split([32])
    assert set(loaded) == {"one"} and set(skipped) == {"wrong"}
    assert set(db.split(None)[0]) == {"one", "wrong"}


def test_job_embeddings_without_matches_change_nothing(sd1):
    job = JobEmbeddings([], sd1, {}, [])
    assert not job
    a = TextConditioner(sd1, CPU).encode("a cat, BREAK a dog").crossattn
    b = TextConditioner(sd1, CPU, embeddings=job).encode("a cat, BREAK a dog").crossattn
    assert torch.equal(a, b)


def test_extra_network_tags_are_not_encoded(sd1):
    cond = TextConditioner(sd1, CPU)
    assert torch.equal(cond.encode("a cat <lora:x:0.5>").crossattn, TextConditioner(sd1, CPU).encode("a cat ").crossattn)
    sched = cond.schedules(["a [cat:dog:2] <lora:y:1>"], 4, is_negative=False)
    assert torch.equal(sched.at(0)[0].crossattn, TextConditioner(sd1, CPU).encode("a cat ").crossattn)
