"""Saving (names, folders, metadata for PNG and JPEG), grids, and seeds/noise."""
from __future__ import annotations

import torch
from PIL import Image

from backend.core.images import FilenameGenerator, image_grid, next_sequence_number, save_image
from backend.core.infotext import read_infotext_from_image
from backend.engine.rng import ImageRNG, fix_seed


def test_save_names_and_metadata(tmp_path):
    img = Image.new("RGB", (16, 16), "red")
    p1 = save_image(img, tmp_path, seed=42, infotext="cat\nSteps: 2, Seed: 42")
    p2 = save_image(img, tmp_path, seed=43, infotext="dog\nSteps: 2, Seed: 43")
    assert p1.name == "00000-42.png" and p2.name == "00001-43.png"
    assert Image.open(p1).info["parameters"] == "cat\nSteps: 2, Seed: 42"
    jpg = save_image(img, tmp_path, seed=44, infotext="a, b\nSteps: 2", fmt="jpg")
    assert jpg.name == "00002-44.jpg"
    assert read_infotext_from_image(Image.open(jpg)) == "a, b\nSteps: 2"
    assert next_sequence_number(tmp_path) == 3


def test_filename_pattern_is_sanitized(tmp_path):
    img = Image.new("RGB", (8, 8))
    p = save_image(img, tmp_path, seed=5, infotext=None, pattern="[seed]-[prompt_words]",
                   name_values={"prompt": "../../etc/passwd a cat"})
    assert p.parent == tmp_path and "/" not in p.name
    assert FilenameGenerator({"seed": 1}).apply("[seed]/[unknown]") == "1_[unknown]"


def test_grid_layout():
    imgs = [Image.new("RGB", (10, 20)) for _ in range(4)]
    assert image_grid(imgs).size == (20, 40)
    assert image_grid(imgs[:3]).size == (20, 40)  # round(sqrt(3)) = 2 rows, 2 columns


def test_seeds_and_noise():
    assert fix_seed(5) == 5
    assert 0 <= fix_seed(-1) < 2 ** 32
    one = ImageRNG((4, 8, 8), [10]).first()
    two = ImageRNG((4, 8, 8), [9, 10]).first()
    assert torch.equal(one[0], two[1])  # per-image generators: batch position does not matter
    var = ImageRNG((4, 8, 8), [10], [99], subseed_strength=0.0).first()
    assert torch.equal(var, one)
    var = ImageRNG((4, 8, 8), [10], [99], subseed_strength=1.0).first()
    other = ImageRNG((4, 8, 8), [99]).first()
    assert torch.allclose(var, other, atol=1e-5)
    resized = ImageRNG((4, 8, 8), [10], seed_resize_from_h=32, seed_resize_from_w=32).first()
    small = ImageRNG((4, 4, 4), [10]).first()
    assert torch.equal(resized[0, :, 2:6, 2:6], small[0])
