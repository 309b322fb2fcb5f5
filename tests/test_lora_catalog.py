"""The extra-network cards' data: cards with the preview beside the file (`name.png` or `name.preview.png`), subfolders,
the base model badge, search, refresh, what a click inserts, and kohya's ss_* metadata for the "i" view."""
from __future__ import annotations

import json
from types import SimpleNamespace

from PIL import Image

from backend.networks.catalog import ExtraNetworksCatalog
from lora_factory import save_lora, simple_lora


def _catalog(tmp_path) -> ExtraNetworksCatalog:
    paths = SimpleNamespace(lora_dirs=[tmp_path / "Lora", tmp_path / "LyCORIS"], embeddings_dir=tmp_path / "embeddings")
    return ExtraNetworksCatalog(paths)


def test_lora_cards_previews_search_refresh_and_metadata(tmp_path):
    lora = tmp_path / "Lora"
    tensors = simple_lora("sd1", seed=1)
    meta = {"ss_sd_model_name": "v1-5-pruned.safetensors", "ss_resolution": "(512, 512)", "ss_network_dim": "32",
            "ss_network_alpha": "16", "ss_network_module": "networks.lora",
            "ss_tag_frequency": json.dumps({"10_castle": {"castle": 7, "stone": 2}, "5_misc": {"stone": 4}})}
    plain = save_lora(lora / "castle.style.safetensors", tensors, family="sd1", metadata=meta)
    Image.new("RGB", (300, 200), (10, 200, 10)).save(lora / "castle.style.png")
    nested = save_lora(lora / "people" / "portrait.safetensors", tensors, family="sdxl")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(nested.with_name("portrait.preview.jpg"))
    save_lora(tmp_path / "LyCORIS" / "bare.pt", tensors)
    save_lora(lora / "tuned.safetensors", tensors)
    (lora / "tuned.json").write_text(json.dumps({"preferred weight": 0.7, "activation text": "tuned style"}))
    catalog = _catalog(tmp_path)

    cards = {c.name: c for c in catalog.lora_cards()}
    assert sorted(cards) == ["bare", "castle.style", "portrait", "tuned"]
    assert cards["castle.style"].preview.startswith("data:image/jpeg;base64,")  # name.png
    assert cards["portrait"].preview.startswith("data:image/jpeg;base64,")  # name.preview.jpg
    assert cards["bare"].preview is None and cards["tuned"].preview is None
    assert (cards["portrait"].subfolder, cards["castle.style"].subfolder) == ("people", "")
    assert (cards["castle.style"].badge, cards["portrait"].badge, cards["bare"].badge) == ("SD 1.x", "SDXL", "")
    assert cards["castle.style"].insert == "<lora:castle.style:1>"
    assert cards["tuned"].insert == "<lora:tuned:0.7> tuned style"
    assert [c.name for c in catalog.lora_cards("PEOPLE")] == ["portrait"]  # subfolder words match too
    assert [c.name for c in catalog.lora_cards("castle style")] == ["castle.style"]
    assert catalog.lora_cards("nothing like it") == []

    details = catalog.lora_details("castle.style")
    summary = details["summary"]
    assert summary["File"] == str(plain) and summary["Base model"] == "SD 1.x"
    assert summary["Trained on checkpoint"] == "v1-5-pruned.safetensors"
    assert summary["Training resolution"] == "(512, 512)" and summary["Rank (dim) / alpha"] == "32 / 16"
    assert details["tags"] == [("castle", 7), ("stone", 6)]
    assert details["metadata"]["ss_tag_frequency"]["10_castle"] == {"castle": 7, "stone": 2}
    assert catalog.lora_details("bare")["metadata"] == {}
    assert catalog.lora_details("missing") is None

    save_lora(lora / "late.safetensors", tensors, family="sd1")
    assert "late" not in {c.name for c in catalog.lora_cards()}
    catalog.refresh_loras()
    assert "late" in {c.name for c in catalog.lora_cards()}
    listed = {x["name"]: x for x in catalog.lora_api_list()}
    assert listed["castle.style"]["alias"] == "castle.style" and listed["castle.style"]["metadata"]["ss_network_dim"] == "32"


def test_cards_sort_by_name_date_and_path_and_the_default_weight(tmp_path):
    import os

    from backend.checkpoints import ModelFile
    from backend.networks.catalog import sort_cards

    lora = tmp_path / "Lora"
    tensors = simple_lora("sd1", seed=2)
    for i, (rel, name) in enumerate((("b_sub", "Alpha"), ("a_sub", "charlie"), ("c_sub", "bravo"))):
        path = save_lora(lora / rel / f"{name}.safetensors", tensors)
        os.utime(path, (1_000_000 + i, 1_000_000 + [30, 10, 20][i]))  # modified: Alpha last, charlie first
    save_lora(lora / "tuned.safetensors", tensors)
    (lora / "tuned.json").write_text(json.dumps({"preferred weight": 0.7}))
    catalog = _catalog(tmp_path)

    cards = [c for c in catalog.lora_cards(multiplier=0.5) if c.name != "tuned"]
    assert [c.name for c in sort_cards(cards, "Name")] == ["Alpha", "bravo", "charlie"]  # case does not matter
    assert [c.name for c in sort_cards(cards, "Name", descending=True)] == ["charlie", "bravo", "Alpha"]
    assert [c.name for c in sort_cards(cards, "Date modified")] == ["charlie", "bravo", "Alpha"]
    assert [c.name for c in sort_cards(cards, "Date modified", descending=True)] == ["Alpha", "bravo", "charlie"]
    assert [c.name for c in sort_cards(cards, "Path")] == ["charlie", "Alpha", "bravo"]  # a_sub, b_sub, c_sub
    assert [c.name for c in sort_cards(cards, "no such order")] == ["Alpha", "bravo", "charlie"]

    inserts = {c.name: c.insert for c in catalog.lora_cards(multiplier=0.5)}
    assert inserts["Alpha"] == "<lora:Alpha:0.5>"  # extra_networks_default_multiplier
    assert inserts["tuned"] == "<lora:tuned:0.7>"  # the file's preferred weight wins

    ckpt = tmp_path / "models" / "sub" / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    Image.new("RGB", (32, 32), (0, 0, 200)).save(ckpt.with_suffix(".preview.png"))
    other = ModelFile("other.ckpt", tmp_path / "models" / "other.ckpt", sha256="ab" * 32)
    checkpoints = [ModelFile("sub/model.safetensors", ckpt), other]
    cards = {c.name: c for c in catalog.checkpoint_cards(checkpoints)}
    assert cards["model"].insert == "sub/model.safetensors" and cards["model"].subfolder == "sub"
    assert cards["model"].preview.startswith("data:image/jpeg;base64,")
    assert cards["other"].insert == "other.ckpt [ababababab]" and cards["other"].preview is None
    assert [c.name for c in catalog.checkpoint_cards(checkpoints, "SUB")] == ["model"]
