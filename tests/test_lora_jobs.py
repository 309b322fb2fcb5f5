"""LoRA and embeddings through the backend's job path (`worker.run_job`, as the backend process runs it):
a LoRA job changes the picture, the next job without it gives bit-identical pixels to a job before any
LoRA, the checkpoint is never read again, infotexts carry `Lora hashes` / `TI hashes`, bad tags warn."""
from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from backend.engine import worker
from backend.checkpoints import HashCache, ModelFile
from backend.engine.devices import DevicePolicy
from backend.engine.networks.activation import NetworkRuntime, parse_lora_args, parse_network_tags
from backend.engine.pipelines.common import StepClock
from backend.core.options import SETTINGS
from backend.core.sampler_catalog import resolve_sampling
from backend.core.schemas import Txt2ImgRequest
from lora_factory import save_embedding, save_lora, simple_lora

torch.set_num_threads(1)
CPU = torch.device("cpu")




def addnet_hash(path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


class Backend:
    """The backend's job state for one checkpoint, with LoRA and embedding folders under `root`."""

    def __init__(self, root, ckpt, policy=None):
        self.root = root
        self.ckpt = ckpt
        (root / "models" / "Lora").mkdir(parents=True, exist_ok=True)
        (root / "models" / "LyCORIS").mkdir(parents=True, exist_ok=True)
        (root / "embeddings").mkdir(parents=True, exist_ok=True)
        self.policy = policy or DevicePolicy(device=CPU, mode="resident", dtype=torch.float32, vae_dtype=torch.float32)
        hashes = HashCache(root / "cache" / "hashes.json")
        self.runtime = NetworkRuntime([root / "models" / "Lora", root / "models" / "LyCORIS"], root / "embeddings", root / "cache",
                                      hypernetwork_dirs=[root / "models" / "hypernetworks"])
        self.state = worker.WorkerState(policy=self.policy, hashes=hashes, cache=worker.ModelCache(self.policy, hashes),
                                        vae=worker.VaeSwitcher(), networks=self.runtime)

    def run(self, prompt: str, negative: str = "blurry", options: dict | None = None, **kw):
        opts = {s.key: s.default for s in SETTINGS}
        opts.update(options or {})
        body = dict(prompt=prompt, negative_prompt=negative, steps=3, width=64, height=64, seed=7, sampler_name="Euler",
                    cfg_scale=6, do_not_save_samples=True, do_not_save_grid=True)
        body.update(kw)
        payload = {"checkpoint": ModelFile(self.ckpt.name, self.ckpt, sha256="1" * 64), "vae": None, "options": opts,
                   "data_dir": self.root, "request": Txt2ImgRequest(**body)}
        payload["sampling"] = resolve_sampling(payload["request"], opts["default_sampler"])  # as the service sends it
        result = worker.run_job("txt2img", payload, self.state, StepClock())
        pixels = np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int32)
        return pixels, result


@pytest.fixture()
def sd1_backend(tmp_path, tiny_models):
    return Backend(tmp_path, tiny_models["sd1"])


def test_lora_changes_the_picture_and_its_removal_restores_it_bit_for_bit(sd1_backend):
    b = sd1_backend
    lora = save_lora(b.root / "models" / "Lora" / "styles" / "fancy.safetensors", simple_lora("sd1", seed=1), family="sd1")
    before, first = b.run("a red house")
    with_lora, result = b.run("a red house <lora:fancy:1>")
    assert np.abs(with_lora - before).mean() > 1.0
    text = result.images[0].infotext
    assert text.startswith("a red house <lora:fancy:1>")  # the tag stays in the saved prompt
    assert f'Lora hashes: "fancy: {addnet_hash(lora)[:12]}"' in text
    assert result.info["extra_generation_params"]["Lora hashes"] == f"fancy: {addnet_hash(lora)[:12]}"
    assert result.warnings == []
    again, _ = b.run("a red house <lora:fancy:1>")
    assert np.array_equal(again, with_lora)
    after, last = b.run("a red house")
    assert np.array_equal(after, before)  # bit-identical to the job before any LoRA
    assert "Lora hashes" not in last.images[0].infotext
    assert b.state.cache.loads == 1  # the checkpoint was read once, never again
    assert b.runtime.reads == 1  # and the LoRA file once


def test_weights_forms_and_several_loras(sd1_backend):
    b = sd1_backend
    save_lora(b.root / "models" / "Lora" / "one.safetensors", simple_lora("sd1", seed=2), family="sd1")
    save_lora(b.root / "models" / "LyCORIS" / "two.pt", simple_lora("sd1", seed=3))
    base, _ = b.run("a cat")
    half, _ = b.run("a cat <lora:one:0.5>")
    named, _ = b.run("a cat <lora:one:unet=0.5:te=0.5>")
    positional, _ = b.run("a cat <lora:one:0.5:0.5>")
    assert np.array_equal(half, named) and np.array_equal(half, positional)
    te_only, _ = b.run("a cat <lora:one:1:0>")
    unet_only, _ = b.run("a cat <lora:one:0:1>")
    negative, _ = b.run("a cat <lora:one:-1>")
    both, result = b.run("a cat <lora:one:0.7> <lyco:two:0.7>")
    pictures = [base, half, te_only, unet_only, negative, both]
    for i in range(len(pictures)):
        for j in range(i + 1, len(pictures)):
            assert not np.array_equal(pictures[i], pictures[j]), (i, j)
    hashes = result.info["extra_generation_params"]["Lora hashes"]
    sha_pt = hashlib.sha256((b.root / "models" / "LyCORIS" / "two.pt").read_bytes()).hexdigest()
    assert hashes.startswith("one: ") and f"two: {sha_pt[:12]}" in hashes
    zero, _ = b.run("a cat <lora:one:0>")
    assert np.array_equal(zero, base)
    back, _ = b.run("a cat")
    assert np.array_equal(back, base)


def test_lora_in_the_negative_prompt_is_applied(sd1_backend):
    b = sd1_backend
    save_lora(b.root / "models" / "Lora" / "neg.safetensors", simple_lora("sd1", seed=4), family="sd1")
    base, _ = b.run("a cat", negative="blurry")
    neg, result = b.run("a cat", negative="blurry <lora:neg:1>")
    assert not np.array_equal(base, neg)
    assert "Negative prompt: blurry <lora:neg:1>" in result.images[0].infotext


def test_bad_tags_and_files_warn_and_the_job_goes_on(sd1_backend):
    b = sd1_backend
    lora_dir = b.root / "models" / "Lora"
    good = save_lora(lora_dir / "good.safetensors", simple_lora("sd1", seed=5), family="sd1")
    (lora_dir / "broken.safetensors").write_bytes(good.read_bytes()[:300])
    save_lora(lora_dir / "xl_style.safetensors", simple_lora("sdxl", seed=6), family="sdxl")
    base, _ = b.run("a dog")
    pixels, result = b.run("a dog <lora:nope:1> <lora:broken:1> <lora:xl_style:0.8> <lora:good:abc> <hypernet:h:1>")
    assert np.array_equal(pixels, base)  # nothing applied, same picture
    text = "\n".join(result.warnings)
    assert "Couldn't find Lora with name nope" in text
    assert "broken.safetensors" in text and "without it" in text
    assert "xl_style" in text and "SDXL" in text and "SD 1.x" in text
    assert "<lora:good:abc>" in text
    assert "hypernet" in text
    mixed, result = b.run("a dog <lora:nope:1> <lora:good:1>")
    assert not np.array_equal(mixed, base) and "good: " in result.info["extra_generation_params"]["Lora hashes"]
    assert result.warnings == ["Couldn't find Lora with name nope"]
    # a LoRA added after the backend started is found without a refresh
    save_lora(lora_dir / "late.safetensors", simple_lora("sd1", seed=8), family="sd1")
    late, result = b.run("a dog <lora:late:1>")
    assert not np.array_equal(late, base) and result.warnings == []


def test_embedding_in_a_job(sd1_backend):
    b = sd1_backend
    emb = save_embedding(b.root / "embeddings" / "shiny.pt", torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 3)
    save_embedding(b.root / "embeddings" / "toowide.pt", torch.randn(1, 48))
    base, _ = b.run("a shiny house")
    emb_pixels, result = b.run("a shiny house")
    assert np.array_equal(base, emb_pixels)  # same prompt, same embedding: same picture
    b.runtime.embeddings.registry.folder = b.root / "nowhere"  # without the embedding folder ...
    plain, _ = b.run("a shiny house")
    b.runtime.embeddings.registry.folder = b.root / "embeddings"
    assert not np.array_equal(plain, base)  # ... the words are plain text: a different picture
    sha = hashlib.sha256(emb.read_bytes()).hexdigest()
    assert f'TI hashes: "shiny: {sha[:12]}"' in result.images[0].infotext
    _, result = b.run("a toowide house")
    assert any("toowide" in w and "48" in w for w in result.warnings)


def test_sdxl_lora_in_a_bfloat16_job(tmp_path, tiny_models):
    policy = DevicePolicy(device=CPU, mode="resident", dtype=torch.bfloat16, vae_dtype=torch.float32)
    b = Backend(tmp_path, tiny_models["sdxl"], policy)
    save_lora(b.root / "models" / "Lora" / "xl.safetensors", simple_lora("sdxl", seed=9), family="sdxl")
    base, _ = b.run("a boat")
    lora, result = b.run("a boat <lora:xl:1>")
    assert not np.array_equal(base, lora) and result.warnings == []
    after, _ = b.run("a boat")
    assert np.array_equal(after, base)


def test_offloaded_model_gets_the_same_lora_result(tmp_path, tiny_models):
    """--lowvram streams UNet blocks from RAM copies: a LoRA changed in place reaches them, and leaves cleanly."""
    ref = Backend(tmp_path / "ref", tiny_models["sd1"])
    lora = simple_lora("sd1", seed=10)
    save_lora(ref.root / "models" / "Lora" / "l.safetensors", lora, family="sd1")
    want_base, _ = ref.run("a tree")
    want_lora, _ = ref.run("a tree <lora:l:1>")
    streamed = Backend(tmp_path / "low", tiny_models["sd1"],
                       DevicePolicy(device=CPU, mode="lowvram", dtype=torch.float32, vae_dtype=torch.float32))
    shutil.copytree(ref.root / "models" / "Lora", streamed.root / "models" / "Lora", dirs_exist_ok=True)
    got_lora, _ = streamed.run("a tree <lora:l:1>")
    got_base, _ = streamed.run("a tree")
    assert np.array_equal(got_lora, want_lora)
    assert np.array_equal(got_base, want_base)


def test_tag_parsing():
    assert parse_lora_args(["x"]).te_multiplier == 1.0
    t = parse_lora_args(["x", "0.4", "0.9", "8"])
    assert (t.te_multiplier, t.unet_multiplier, t.dyn_dim) == (0.4, 0.9, 8)
    t = parse_lora_args(["x", "unet=0.8", "te=0.5"])
    assert (t.te_multiplier, t.unet_multiplier) == (0.5, 0.8)
    t = parse_lora_args(["x", "0.3", "dyn=4"])
    assert (t.te_multiplier, t.unet_multiplier, t.dyn_dim) == (0.3, 0.3, 4)
    tags, warnings = parse_network_tags(["a <lora:a:1> b <lyco:b:-0.5>", "neg <lora:c>"])
    assert [(t.name, t.unet_multiplier) for t in tags] == [("a", 1.0), ("b", -0.5), ("c", 1.0)] and not warnings
