"""Infotext: writing, parsing (A1111's rules), reading from PNG/JPEG/WebP/stealth images, API fields."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.core.infotext import (
    build_infotext,
    decode_user_comment,
    infotext_to_request_fields,
    parse_infotext,
    png_pnginfo,
    read_infotext_from_image,
    split_sampler_name,
)

SAMPLES = Path(__file__).resolve().parent / "data" / "a1111"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is absent")

SAMPLE_TEXT = ("photo of a duck\nNegative prompt: monochrome\nSteps: 15, Sampler: UniPC, CFG scale: 5, "
               "Seed: 235284042, Size: 512x400, Model hash: c0d1994c73, Model: realistic_realisticVisionV20_v20")


# --- writing -----------------------------------------------------------------------------------

def test_build_orders_known_keys_then_extras_then_version():
    params = {"Version": "v1", "Hires upscale": 2, "Seed": 5, "Steps": 20, "Size": "512x768",
              "Sampler": "Euler a", "Lora hashes": "x", "CFG scale": 7.0, "Schedule type": "Karras"}
    text = build_infotext("a cat", "blurry", params)
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Karras, "
                    "CFG scale: 7, Seed: 5, Size: 512x768, Hires upscale: 2, Lora hashes: x, Version: v1")


def test_build_full_canonical_order():
    keys = ["Tiling", "ENSD", "Clip skip", "Denoising strength", "Seed resize from", "Variation seed strength",
            "Variation seed", "VAE", "VAE hash", "Model", "Model hash", "Size", "Face restoration", "Seed",
            "Image CFG scale", "CFG scale", "Schedule type", "Sampler", "Steps"]
    text = build_infotext("p", "", {k: "v" for k in keys})
    assert [item.split(":")[0] for item in text.split("\n")[1].split(", ")] == keys[::-1]


def test_build_skips_empty_and_omits_empty_negative():
    text = build_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler", "VAE": None, "Model": "", "Seed": 1})
    assert text == "a cat\nSteps: 20, Sampler: Euler, Seed: 1"


def test_build_value_formats():
    text = build_infotext("p", "", {"CFG scale": 7.5, "Denoising strength": 0.1 + 0.2, "Steps": 30,
                                    "Tiling": True, "Size": (640, 480), "Variation seed strength": 1.0})
    assert text.split("\n")[1] == ("Steps: 30, CFG scale: 7.5, Size: 640x480, Variation seed strength: 1, "
                                   "Denoising strength: 0.3, Tiling: True")


def test_build_numpy_numbers():
    text = build_infotext("p", "", {"Seed": np.int64(12), "CFG scale": np.float32(4.5), "Steps": np.int32(3)})
    assert text == "p\nSteps: 3, CFG scale: 4.5, Seed: 12"


def test_build_quotes_values_that_would_break_the_line():
    text = build_infotext("p", "", {"Steps": 1, "Lora hashes": "a: 1234, b: 5678", "Note": 'say "hi"',
                                    "Hires prompt": "line one\nline two"})
    assert text.split("\n")[1] == ('Steps: 1, Lora hashes: "a: 1234, b: 5678", Note: "say \\"hi\\"", '
                                   'Hires prompt: "line one\\nline two"')


def test_build_keeps_non_ascii():
    text = build_infotext("un chat, été", "", {"Steps": 1, "Model": "modèle: v2"})
    assert text == 'un chat, été\nSteps: 1, Model: "modèle: v2"'


# --- parsing -----------------------------------------------------------------------------------

def test_parse_a1111_sample_text():
    p = parse_infotext(SAMPLE_TEXT)
    assert p["Prompt"] == "photo of a duck"
    assert p["Negative prompt"] == "monochrome"
    assert p["Steps"] == "15"
    assert p["Sampler"] == "UniPC"
    assert p["CFG scale"] == "5"
    assert p["Seed"] == "235284042"
    assert p["Size-1"] == 512 and p["Size-2"] == 400
    assert p["Model hash"] == "c0d1994c73"
    assert p["Model"] == "realistic_realisticVisionV20_v20"
    assert p["Schedule type"] == "Automatic"
    assert p["Clip skip"] == "1"
    assert p["Hires resize-1"] == 0 and p["Hires resize-2"] == 0
    assert "Emphasis" not in p


def test_parse_multiline_prompt_and_negative():
    text = "line one\nline two (x)\nNegative prompt: bad\nworse\nSteps: 20, Sampler: Euler, Seed: 3"
    p = parse_infotext(text)
    assert p["Prompt"] == "line one\nline two (x)"
    assert p["Negative prompt"] == "bad\nworse"
    assert p["Steps"] == "20" and p["Seed"] == "3"
    assert p["Emphasis"] == "Original"


def test_parse_windows_newlines():
    p = parse_infotext("a\r\nNegative prompt: b\r\nSteps: 1, Sampler: Euler, Seed: 2")
    assert (p["Prompt"], p["Negative prompt"], p["Seed"]) == ("a", "b", "2")


def test_parse_last_line_with_few_params_belongs_to_prompt():
    p = parse_infotext("a cat\nstyle: anime, mood: calm")
    assert p["Prompt"] == "a cat\nstyle: anime, mood: calm"
    assert "style" not in p
    p = parse_infotext("just a prompt")
    assert p["Prompt"] == "just a prompt" and p["Negative prompt"] == ""


def test_parse_quoted_values():
    text = 'p\nSteps: 1, Lora hashes: "a: 1234, b: 5678", Note: "say \\"hi\\"", Sampler: Euler'
    p = parse_infotext(text)
    assert p["Lora hashes"] == "a: 1234, b: 5678"
    assert p["Note"] == 'say "hi"'
    assert p["Sampler"] == "Euler"


def test_parse_sizes_give_int_parts():
    p = parse_infotext("p\nSteps: 1, Size: 640x480, Hires resize: 1280x960, Seed resize from: 512x512")
    assert (p["Size-1"], p["Size-2"]) == (640, 480)
    assert (p["Hires resize-1"], p["Hires resize-2"]) == (1280, 960)
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == (512, 512)


@pytest.mark.parametrize("combined, sampler, schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("Euler a SGM Uniform", "Euler a", "SGM Uniform"),
    ("Euler SGMUniform", "Euler", "SGM Uniform"),
    ("DPM++ 2M Align Your Steps 11", "DPM++ 2M", "Align Your Steps 11"),
    ("DDIM", "DDIM", None),
    ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", None),
    ("Euler a", "Euler a", None),
])
def test_split_sampler_name(combined, sampler, schedule):
    assert split_sampler_name(combined) == (sampler, schedule)


def test_parse_splits_combined_sampler():
    p = parse_infotext("p\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7")
    assert p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    p = parse_infotext("p\nSteps: 20, Sampler: Euler, Schedule type: Beta, CFG scale: 7")
    assert p["Sampler"] == "Euler" and p["Schedule type"] == "Beta"


def test_parse_old_first_pass_size():
    p = parse_infotext("p\nSteps: 20, Size: 1024x1024, First pass size: 0x0, Denoising strength: 0.7")
    assert (p["Size-1"], p["Size-2"]) == (512, 512)
    assert (p["Hires resize-1"], p["Hires resize-2"]) == (1024, 1024)


def test_round_trip_build_then_parse():
    params = {"Steps": 28, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 1234,
              "Size": "832x1216", "Model hash": "abcdef1234", "Model": "my model, v2", "Clip skip": 2,
              "Denoising strength": 0.45, "Hires upscale": 1.5, "Hires steps": 10, "Hires upscaler": "Latent",
              "Lora hashes": "detail: 0123456789ab", "Version": "easel"}
    prompt = "a (red:1.2) fox, [forest:city:0.5]\nsecond line"
    negative = "blurry, lowres\nsecond"
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    for key, value in params.items():
        expected = {6.5: "6.5", 0.45: "0.45", 1.5: "1.5"}.get(value, str(value)) if not isinstance(value, str) else value
        assert parsed[key] == expected, key
    assert (parsed["Size-1"], parsed["Size-2"]) == (832, 1216)


def test_lora_tags_and_hashes_survive_send_to_txt2img():
    """PNG Info -> Send to txt2img: the tags stay in the prompts, the hash lists only under their own keys."""
    text = ('a castle <lora:name:0.8>, (stone:1.1) <lora:other_one:0.5:te=0.2>\n'
            'Negative prompt: blurry <lora:neg_style:-0.6>\n'
            'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 11, Size: 512x512, Model hash: 0123456789, '
            'Lora hashes: "name: abc123, other_one: def456, neg_style: 0a1b2c", TI hashes: "shiny: 9f8e7d", '
            'Version: easel')
    p = parse_infotext(text)
    assert p["Prompt"] == "a castle <lora:name:0.8>, (stone:1.1) <lora:other_one:0.5:te=0.2>"
    assert p["Negative prompt"] == "blurry <lora:neg_style:-0.6>"
    assert p["Lora hashes"] == "name: abc123, other_one: def456, neg_style: 0a1b2c"
    assert p["TI hashes"] == "shiny: 9f8e7d"
    assert (p["Seed"], p["Version"], p["Size-1"]) == ("11", "easel", 512)
    fields = infotext_to_request_fields(p)
    assert fields["prompt"] == p["Prompt"] and fields["negative_prompt"] == p["Negative prompt"]
    assert (fields["seed"], fields["steps"], fields["sampler_name"]) == (11, 20, "Euler a")
    # no field (nor a setting override) picks up either hash list or a piece of it
    flat = repr(fields)
    for leaked in ("abc123", "def456", "9f8e7d", "hashes"):
        assert leaked not in flat, leaked
    # written by Easel and read back, the same
    again = parse_infotext(build_infotext(p["Prompt"], p["Negative prompt"],
                                          {"Steps": 20, "Seed": 11, "Lora hashes": p["Lora hashes"],
                                           "TI hashes": p["TI hashes"]}))
    assert (again["Prompt"], again["Lora hashes"], again["TI hashes"]) == (p["Prompt"], p["Lora hashes"], p["TI hashes"])


# --- request fields ----------------------------------------------------------------------------

def test_request_fields_from_sample():
    fields = infotext_to_request_fields(parse_infotext(SAMPLE_TEXT))
    assert fields == {
        "prompt": "photo of a duck", "negative_prompt": "monochrome", "steps": 15, "sampler_name": "UniPC",
        "scheduler": "automatic", "cfg_scale": 5.0, "seed": 235284042, "width": 512, "height": 400,
        "clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "sd_model_checkpoint": "realistic_realisticVisionV20_v20 [c0d1994c73]",
    }


def test_request_fields_full():
    text = ("p\nNegative prompt: n\nSteps: 30, Sampler: DPM++ 2M SGM Uniform, CFG scale: 7.5, Seed: 42, "
            "Face restoration: CodeFormer, Size: 512x768, Model hash: 0123456789, Variation seed: 7, "
            "Variation seed strength: 0.3, Seed resize from: 256x256, Denoising strength: 0.55, Clip skip: 2, "
            "ENSD: 31337, Tiling: True, Hires upscale: 2, Hires steps: 12, Hires upscaler: R-ESRGAN 4x+, "
            "Hires sampler: Euler, Hires schedule type: Karras, Version: v1.10.1")
    f = infotext_to_request_fields(parse_infotext(text))
    assert f["sampler_name"] == "DPM++ 2M" and f["scheduler"] == "sgm_uniform"
    assert f["cfg_scale"] == 7.5 and f["seed"] == 42 and f["steps"] == 30
    assert (f["width"], f["height"]) == (512, 768)
    assert (f["subseed"], f["subseed_strength"]) == (7, 0.3)
    assert (f["seed_resize_from_w"], f["seed_resize_from_h"]) == (256, 256)
    assert f["denoising_strength"] == 0.55
    assert f["clip_skip"] == 2
    assert f["override_settings"] == {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}
    assert f["tiling"] is True and f["restore_faces"] is True
    assert f["enable_hr"] is True and f["hr_scale"] == 2.0 and f["hr_second_pass_steps"] == 12
    assert f["hr_upscaler"] == "R-ESRGAN 4x+"
    assert (f["hr_resize_x"], f["hr_resize_y"]) == (0, 0)
    assert f["hr_sampler_name"] == "Euler" and f["hr_scheduler"] == "karras"
    assert f["sd_model_checkpoint"] == "0123456789"
    assert "hr_prompt" not in f and "hr_checkpoint_name" not in f


def test_request_fields_hires_resize_and_no_hires():
    f = infotext_to_request_fields(parse_infotext("p\nSteps: 20, Size: 512x512, Hires resize: 1024x768, "
                                                  "Hires upscaler: Latent, Denoising strength: 0.6"))
    assert f["enable_hr"] is True and (f["hr_resize_x"], f["hr_resize_y"]) == (1024, 768)
    f = infotext_to_request_fields(parse_infotext(SAMPLE_TEXT))
    assert "enable_hr" not in f and "hr_scale" not in f and "tiling" not in f


def test_request_fields_ignore_unknown_and_bad_numbers():
    f = infotext_to_request_fields({"Prompt": "p", "Steps": "many", "Seed": "-1", "Whatever": "x"})
    assert f == {"prompt": "p", "seed": -1}


# --- images ------------------------------------------------------------------------------------

@needs_samples
def test_read_sample_png():
    text = read_infotext_from_image(Image.open(SAMPLES / "automatic1111_cropped.png"))
    assert text == SAMPLE_TEXT


@needs_samples
def test_read_sample_jpeg_exif_utf16_be():
    text = read_infotext_from_image(Image.open(SAMPLES / "automatic1111_cropped.jpg"))
    assert text == SAMPLE_TEXT


@needs_samples
def test_read_sample_stealth_png():
    img = Image.open(SAMPLES / "automatic1111_stealth.png")
    assert not img.info.get("parameters")
    p = parse_infotext(read_infotext_from_image(img))
    assert p["Prompt"] == "a circle" and p["Negative prompt"] == "a square"
    assert p["Steps"] == "20" and p["Seed"] == "2015833630" and p["Clip skip"] == "2"
    assert p["Version"] == "v1.9.4-169-ga30b19dd"


def _reopen(img: Image.Image, fmt: str, **save_kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    buf.seek(0)
    return Image.open(buf)


def _exif_with_comment(raw: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = raw
    return exif.tobytes()


def test_png_pnginfo_round_trip_latin1_and_unicode():
    for text in (SAMPLE_TEXT, "猫, (かわいい:1.2)\nSteps: 1, Sampler: Euler, Seed: 1"):
        img = _reopen(Image.new("RGB", (8, 8)), "PNG", pnginfo=png_pnginfo(text))
        assert read_infotext_from_image(img) == text


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_exif_user_comment_unicode(fmt, encoding):
    text = "un chat été\nSteps: 1, Sampler: Euler, Seed: 1"
    exif = _exif_with_comment(b"UNICODE\0" + text.encode(encoding))
    img = _reopen(Image.new("RGB", (16, 16)), fmt, exif=exif)
    assert read_infotext_from_image(img) == text


def test_decode_user_comment_variants():
    assert decode_user_comment(b"ASCII\0\0\0Steps: 1") == "Steps: 1"
    assert decode_user_comment(b"UNICODE\0\xfe\xff" + "x".encode("utf-16-be")) == "x"
    assert decode_user_comment(b"UNICODE\0\xff\xfe" + "x".encode("utf-16-le")) == "x"
    assert decode_user_comment(b"UNICODE\0" + "ab".encode("utf-16-be") + b"\0") == "ab"  # odd byte dropped
    assert decode_user_comment(b"\0" * 8 + b"plain") == "plain"
    assert decode_user_comment(b"no prefix at all") == "no prefix at all"


def _stealth(img: Image.Image, text: str, signature: str) -> Image.Image:
    """Embed `text` the way the stealth-pnginfo extension writes it (column-major LSBs)."""
    data = text.encode("utf-8")
    if signature.endswith("comp"):
        data = gzip.compress(data)
    payload = signature.encode() + (len(data) * 8).to_bytes(4, "big") + data
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    arr = np.array(img)
    columns = arr.transpose(1, 0, 2).copy()  # (x, y, channel)
    if signature.startswith("stealth_png"):
        flat = columns[..., 3].reshape(-1)
    else:
        flat = columns[..., :3].reshape(-1)
    flat[: len(bits)] = (flat[: len(bits)] & 0xFE) | bits
    if signature.startswith("stealth_png"):
        columns[..., 3] = flat.reshape(columns.shape[:2])
    else:
        columns[..., :3] = flat.reshape(columns[..., :3].shape)
    return Image.fromarray(columns.transpose(1, 0, 2).copy(), mode=img.mode)


@pytest.mark.parametrize("signature, mode", [
    ("stealth_pnginfo", "RGBA"), ("stealth_pngcomp", "RGBA"), ("stealth_rgbinfo", "RGB"), ("stealth_rgbcomp", "RGBA"),
])
def test_stealth_round_trip(signature, mode):
    rng = np.random.default_rng(0)
    channels = 4 if mode == "RGBA" else 3
    base = Image.fromarray(rng.integers(0, 256, (40, 30, channels), dtype=np.uint8), mode=mode)
    text = "a fox, (snow:1.2)\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, Seed: 9, Size: 30x40"
    img = _reopen(_stealth(base, text, signature), "PNG")
    assert read_infotext_from_image(img) == text


def test_text_chunk_wins_over_stealth():
    base = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    img = _reopen(_stealth(base, "hidden\nSteps: 1, Seed: 1, Sampler: Euler", "stealth_pnginfo"), "PNG",
                  pnginfo=png_pnginfo("visible\nSteps: 2, Seed: 2, Sampler: Euler"))
    assert read_infotext_from_image(img).startswith("visible")


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (1, 1)),
    lambda: Image.new("RGBA", (3, 2), (1, 1, 1, 1)),  # all LSBs set: no signature
    lambda: Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8), mode="RGBA"),
    lambda: Image.new("P", (10, 10)),
    lambda: Image.new("L", (10, 10)),
    lambda: Image.new("LA", (10, 10)),
    lambda: Image.new("I;16", (10, 10)),
    lambda: Image.new("1", (10, 10)),
    lambda: Image.new("RGB", (0, 0)),
])
def test_images_without_infotext_give_none(make):
    assert read_infotext_from_image(make()) is None


def test_truncated_stealth_and_broken_exif_give_none():
    # A valid signature claiming more data than the image holds.
    arr = np.zeros((4, 64, 4), dtype=np.uint8)
    payload = b"stealth_pngcomp" + (10**6).to_bytes(4, "big")
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    columns = arr.transpose(1, 0, 2).copy()
    flat = columns[..., 3].reshape(-1)
    flat[: len(bits)] = bits
    columns[..., 3] = flat.reshape(columns.shape[:2])
    assert read_infotext_from_image(Image.fromarray(columns.transpose(1, 0, 2).copy(), mode="RGBA")) is None

    img = Image.new("RGB", (4, 4))
    img.info["exif"] = b"Exif\0\0garbage"
    assert read_infotext_from_image(img) is None


def test_stealth_gzip_bomb_is_refused():
    rng = np.random.default_rng(2)
    base = Image.fromarray(rng.integers(0, 256, (400, 500, 4), dtype=np.uint8), mode="RGBA")
    img = _stealth(base, "a" * (20 * 1024 * 1024), "stealth_pngcomp")  # ~20 KB compressed, 20 MB inflated
    assert read_infotext_from_image(img) is None


def test_not_an_image_gives_none():
    assert read_infotext_from_image(object()) is None  # type: ignore[arg-type]
