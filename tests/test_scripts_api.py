"""Selectable scripts (A1111's Script dropdown) through the API: Prompt matrix, Prompts from file or textbox,
Loopback with A1111-ordered `script_args`, /scripts and /script-info, and refusals at the edge."""
from __future__ import annotations

import base64
import io
import json
import math
import time

import numpy as np
import pytest
from PIL import Image

from backend.core.infotext import parse_infotext
from test_api_img2img import SD1, body, picture


def txt(**kw) -> dict:
    b = {"prompt": "a red boat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7,
         "seed": 7, "override_settings": {"sd_model_checkpoint": SD1}}
    b.update(kw)
    return b


def answer(resp) -> tuple[list[Image.Image], dict]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    images = [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in data["images"]]
    return images, json.loads(data["info"])


def test_scripts_lists_as_a1111(api):
    r = api.get("/scripts")
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"txt2img", "img2img"}
    assert "prompt matrix" in data["txt2img"] and "prompts from file or textbox" in data["txt2img"]
    assert "loopback" not in data["txt2img"]
    for name in ("prompt matrix", "prompts from file or textbox", "loopback", "sd upscale", "poor man's outpainting"):
        assert name in data["img2img"]
    assert all(name == name.lower() for tab in data.values() for name in tab)


def test_script_info_shape(api):
    r = api.get("/script-info")
    assert r.status_code == 200
    infos = r.json()
    loopback = next(i for i in infos if i["name"] == "loopback")
    assert loopback["is_img2img"] is True and loopback["is_alwayson"] is False
    loops = loopback["args"][0]
    assert loops == {"label": "Loops", "value": 4, "minimum": 1, "maximum": 32, "step": 1, "choices": None}
    assert loopback["args"][2]["choices"] == ["Aggressive", "Linear", "Lazy"]
    matrix = [i for i in infos if i["name"] == "prompt matrix"]
    assert sorted(i["is_img2img"] for i in matrix) == [False, True]
    upscale = next(i for i in infos if i["name"] == "sd upscale")
    assert "Lanczos" in upscale["args"][2]["choices"]


def test_prompt_matrix_grid_images_and_legends(api, server):
    args = [False, True, "positive", "comma", 0]  # put at start, different seeds, prompt type, joining char, margin
    r = api.post("/txt2img", json=txt(prompt="a house|red|blue", script_name="Prompt matrix", script_args=args,
                                      save_images=True))
    images, info = answer(r)
    assert len(images) == 5  # the grid, then 2^2 pictures
    assert info["index_of_first_image"] == 1 and len(info["infotexts"]) == 5
    assert info["all_prompts"] == ["a house", "a house, red", "a house, blue", "a house, red, blue"]
    assert info["all_seeds"] == [7, 8, 9, 10]
    assert info["infotexts"][0] == info["infotexts"][1]
    for text, prompt, seed in zip(info["infotexts"][1:], info["all_prompts"], info["all_seeds"]):
        assert text.startswith(prompt + "\n") and parse_infotext(text)["Seed"] == str(seed)
    grid, cells = images[0], images[1:]
    # legends above and left of the 2x2 cells: the grid is larger than a plain grid of them ...
    assert grid.width > 128 and grid.height > 128
    pad_left, pad_top = grid.width - 128, grid.height - 128
    # ... the cells sit at the bottom right, in combination order ...
    for i, cell in enumerate(cells):
        x, y = pad_left + (i % 2) * 64, pad_top + (i // 2) * 64
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 64))), np.asarray(cell))
    # ... and the legend area has text drawn on white
    legend = np.asarray(grid.crop((pad_left, 0, grid.width, pad_top)))
    assert (legend < 128).any() and (legend == 255).any()
    saved = list((server.data_dir / "outputs" / "txt2img-grids").rglob("*prompt_matrix*.png"))
    assert saved and Image.open(max(saved, key=lambda p: p.stat().st_mtime)).info["parameters"] == info["infotexts"][0]


def test_prompt_matrix_margins_and_same_seed(api):
    r = api.post("/txt2img", json=txt(prompt="a house|red", script_name="prompt matrix", script_args=[True, False, "positive", "space", 10]))
    images, info = answer(r)
    assert len(images) == 3 and info["all_seeds"] == [7, 7]
    assert info["all_prompts"] == ["a house", "red a house"]
    assert images[0].width == 2 * 64 + 10  # one column label row, no row labels: margin between the 2 cells


def test_prompt_matrix_batch_size_batches_the_combinations(api):
    """As A1111's: batch size 3 runs the 4 combinations in two batches (3 + 1): the same pictures, prompts and seeds
    as one picture per batch, and one progress bar of 2 batches."""
    args = [False, False, "negative", "comma", 0]  # the negative prompt split
    one = answer(api.post("/txt2img", json=txt(negative_prompt="blurry|dark|grainy", script_name="Prompt matrix",
                                               script_args=args)))
    three = answer(api.post("/txt2img", json=txt(negative_prompt="blurry|dark|grainy", script_name="Prompt matrix",
                                                 script_args=args, batch_size=3, n_iter=7)))
    for images, info in (one, three):
        assert len(images) == 5 and info["index_of_first_image"] == 1
        assert info["all_negative_prompts"] == ["blurry", "blurry, dark", "blurry, grainy", "blurry, dark, grainy"]
        assert info["all_prompts"] == ["a red boat"] * 4 and info["all_seeds"] == [7] * 4
        assert len(set(info["all_subseeds"])) == 4  # the variation seed plus the picture's number
    assert three[1]["infotexts"][1:] == one[1]["infotexts"][1:]
    for a, b in zip(one[0][1:], three[0][1:]):  # a batch makes the pictures one at a time would (CPU rounding aside)
        assert np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() < 2
    assert not np.array_equal(np.asarray(three[0][1]), np.asarray(three[0][2]))  # each its own prompt


def test_prompt_matrix_batches_in_img2img(api):
    init = picture(64, 64)
    images, info = answer(api.post("/img2img", json=body(init, steps=2, prompt="a house|at night", batch_size=2,
                                                         script_name="Prompt matrix",
                                                         script_args=[False, True, "positive", "comma", 0])))
    assert len(images) == 3 and info["all_prompts"] == ["a house", "a house, at night"]
    assert info["all_seeds"] == [99, 100]
    assert [parse_infotext(t)["Seed"] for t in info["infotexts"][1:]] == ["99", "100"]
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[2]))


def test_prompts_from_file_lines_with_options(api):
    text = ('first prompt\n--prompt "second prompt" --steps 3 --seed 5 --sampler_name DDIM\n\n'
            '--negative_prompt "ugly" --cfg_scale 4.5')
    r = api.post("/txt2img", json=txt(prompt="", script_name="Prompts from file or textbox",
                                      script_args=[False, False, "start", text]))
    images, info = answer(r)
    assert len(images) == 3 and info["index_of_first_image"] == 0
    params = [parse_infotext(t) for t in info["infotexts"]]
    assert info["infotexts"][0].startswith("first prompt\n")
    assert info["infotexts"][1].startswith("second prompt\n")
    assert params[0]["Steps"] == "2" and params[1]["Steps"] == "3" and params[2]["Steps"] == "2"
    assert params[1]["Seed"] == "5" and params[0]["Seed"] == "7"
    assert params[1]["Sampler"] == "DDIM" and params[0]["Sampler"] == params[2]["Sampler"] == "Euler"
    assert "Negative prompt: ugly" in info["infotexts"][2] and params[2]["CFG scale"] == "4.5"


def test_prompts_from_file_iterate_seed_and_position(api):
    r = api.post("/txt2img", json=txt(prompt="base", script_name="prompts from file or textbox",
                                      script_args=[True, False, "end", "one\ntwo"]))
    _, info = answer(r)
    assert info["all_prompts"] == ["base one", "base two"] and info["all_seeds"] == [7, 8]


@pytest.mark.parametrize("line, words", [("--stepz 3", "unknown commandline option: --stepz"), ("--steps many", "--steps 'many'"),
                                         ("--steps 1001", "steps must be between"),
                                         ("--sampler_name Nope", "Nope"),
                                         ("--outpath_samples /tmp", "output folders")])
def test_prompts_from_file_bad_line_is_named(api, line, words):
    r = api.post("/txt2img", json=txt(script_name="Prompts from file or textbox",
                                      script_args=[False, False, "start", f"fine\n{line}"]))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "line 2" in detail and words in detail, detail


def test_loopback_denoising_follows_the_curve(api):
    init = picture(64, 64)
    loops, final = 3, 0.2
    r = api.post("/img2img", json=body(init, steps=4, denoising_strength=0.8, script_name="Loopback",
                                       script_args=[loops, final, "Aggressive", "None"]))
    images, info = answer(r)
    assert len(images) == 1 + loops and info["index_of_first_image"] == 1
    strengths = [float(parse_infotext(t)["Denoising strength"]) for t in info["infotexts"][1:]]
    expected = [0.8 + (final - 0.8) * math.sin(i / (loops - 1) * math.pi / 2) for i in range(loops)]
    assert strengths == pytest.approx(expected, abs=1e-3)
    seeds = [int(parse_infotext(t)["Seed"]) for t in info["infotexts"][1:]]
    assert seeds == [99, 100, 101]
    first = parse_infotext(info["infotexts"][1])
    assert first["Final denoising strength"] == "0.2" and first["Denoising curve"] == "Aggressive"
    assert images[0].size == (64 * loops, 64)  # one row of the loops' pictures
    # each loop starts from the previous picture: loops differ
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[2]))


def _chroma(image: Image.Image) -> np.ndarray:
    """The mean a and b of the picture in 8-bit LAB (its colour, without its light)."""
    import cv2
    return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2LAB)[..., 1:].reshape(-1, 2).mean(0)


def test_img2img_colour_correction_matches_the_init_colours(api):
    """The setting img2img_color_correction (A1111's): the output takes the colours of its input, in plain img2img
    and in every loop of Loopback."""
    init = Image.new("RGB", (64, 64), (40, 170, 60))
    init.paste((20, 120, 200), (0, 0, 32, 64))  # green and blue halves
    settings = {"sd_model_checkpoint": SD1}
    plain = answer(api.post("/img2img", json=body(init, denoising_strength=1.0, override_settings=settings)))[0][0]
    corrected = answer(api.post("/img2img", json=body(
        init, denoising_strength=1.0, override_settings=dict(settings, img2img_color_correction=True))))[0][0]
    target = _chroma(init)
    off = lambda image: float(np.abs(_chroma(image) - target).sum())  # noqa: E731
    # the output's own light is kept (A1111's luminosity blend), which moves its colours a little off the target
    assert off(corrected) < 0.6 * off(plain) and off(plain) > 20, (_chroma(plain), _chroma(corrected), target)
    # the correction keeps the model's light and dark: the same picture under other colours
    lum = lambda im: np.asarray(im.convert("L"), dtype=np.float32).ravel()  # noqa: E731
    assert np.corrcoef(lum(plain), lum(corrected))[0, 1] > 0.8

    images, info = answer(api.post("/img2img", json=body(
        init, steps=2, denoising_strength=1.0, override_settings=dict(settings, img2img_color_correction=True),
        script_name="Loopback", script_args=[3, 1.0, "Linear", "None"])))
    assert len(images) == 4 and info["index_of_first_image"] == 1
    for image in images[1:]:
        assert off(image) < 0.6 * off(plain), (_chroma(image), target)


def test_unknown_script_is_422_in_both_tabs(api):
    r = api.post("/txt2img", json=txt(script_name="Nope script"))
    assert r.status_code == 422 and "Nope script" in r.json()["detail"], r.text
    r = api.post("/img2img", json=body(picture(64, 64), script_name="Nope script"))
    assert r.status_code == 422 and "SD upscale" in r.json()["detail"], r.text
    r = api.post("/txt2img", json=txt(script_name="Loopback"))  # an img2img-only script
    assert r.status_code == 422 and "Loopback" in r.json()["detail"]


def test_unknown_alwayson_script_is_422(api):
    r = api.post("/txt2img", json=txt(alwayson_scripts={"ADetailer": {"args": []}}))
    assert r.status_code == 422 and "ADetailer" in r.json()["detail"], r.text
    r = api.post("/txt2img", json=txt(alwayson_scripts={"Soft Inpainting": {"args": [True]}}))
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("name, args, words", [
    ("Prompt matrix", [False, False, "sideways"], "script_args[2]: select prompt must be one of"),
    ("Prompt matrix", [False, False, "positive", "comma", 9999], "script_args[4]: grid margins (px) must be between 0 and 2048"),
    ("Prompt matrix", [False, False, "positive", "comma", 0, "extra"], "takes 5 script_args"),
])
def test_bad_script_arg_is_named(api, name, args, words):
    r = api.post("/txt2img", json=txt(prompt="a|b", script_name=name, script_args=args))
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_bad_loopback_arg_is_named(api):
    r = api.post("/img2img", json=body(picture(64, 64), script_name="Loopback", script_args=[0]))
    assert r.status_code == 422 and "script_args[0]: loops must be between 1 and 1000" in r.json()["detail"], r.text
    r = api.post("/img2img", json=body(picture(64, 64), script_name="Loopback",
                                       script_args=[2, 0.5, "Linear", "BLIP"]))
    assert r.status_code == 422 and "script_args[3]" in r.json()["detail"], r.text


def test_missing_trailing_args_take_defaults(api):
    # Loopback with only the loop count: final strength 0.5, curve Linear (A1111 fills the rest with defaults)
    r = api.post("/img2img", json=body(picture(64, 64), steps=2, denoising_strength=0.7, script_name="loopback",
                                       script_args=[2]))
    _, info = answer(r)
    strengths = [float(parse_infotext(t)["Denoising strength"]) for t in info["infotexts"][1:]]
    assert strengths == pytest.approx([0.7, 0.5], abs=1e-3)


def test_interrupt_stops_a_script(api):
    """Interrupt during Prompts from file: the job ends early with the images made so far."""
    import threading

    text = "\n".join(f"line {i}" for i in range(30))
    result = {}

    def run():
        result["r"] = api.post("/txt2img", json=txt(steps=4, script_name="Prompts from file or textbox",
                                                    script_args=[False, False, "start", text]))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the script's job has made progress
        progress = api.get("/progress").json()
        if progress["state"]["job_count"] == 30 and progress["progress"] > 0:
            break
        time.sleep(0.05)
    api.post("/interrupt")
    thread.join(300)
    _, info = answer(result["r"])
    assert info["interrupted"] is True and len(info["infotexts"]) < 30


def test_prompts_from_file_line_styles_that_do_not_exist_are_warned_about(api):
    # a line's --styles are applied like the request's (tests/test_styles.py); a name no styles.csv holds is named
    r = api.post("/txt2img", json=txt(steps=1, script_name="Prompts from file or textbox",
                                      script_args=[False, False, "start", '--prompt "x" --styles "my style"']))
    _, info = answer(r)
    assert any(w.startswith("style 'my style' does not exist") for w in info["warnings"]), info.get("warnings")


def test_prompt_matrix_combinations_with_unpaired_brackets_are_accepted(api):
    # "a (b" is one of the combinations: as in A1111 its unclosed bracket weighs the rest (issue 14 turned the
    # earlier refusal into acceptance)
    r = api.post("/txt2img", json=txt(prompt="a (b|c)", script_name="Prompt matrix"))
    images, info = answer(r)
    assert len(images) == 3 and info["all_prompts"] == ["a (b", "a (b, c)"]


def test_outpainting_mk2_grows_one_side_with_matched_noise(api, server):
    init = picture(64, 64)
    before = set((server.data_dir / "outputs" / "img2img-images").rglob("*.png"))
    # processed at 128x64: the pass covers the new border and the picture (the kept part pasted back)
    r = api.post("/img2img", json=body(init, steps=2, denoising_strength=0.8, save_images=True, width=128,
                                       script_name="Outpainting mk2", script_args=["", 64, 2, ["left"], 1.0, 0.05]))
    images, info = answer(r)
    assert len(images) == 1 and images[0].size == (128, 64)
    grown = np.asarray(images[0]).astype(int)
    diff = np.abs(grown[:, 64:] - np.asarray(init).astype(int)).max(axis=(0, 2))
    assert (diff[32:] == 0).all()  # the picture, untouched, away from the seam
    assert grown[:, :64].std() > 1  # a new left border, not a flat fill
    assert info["infotexts"][0].startswith("a red boat\n") and "Size: 128x64" in info["infotexts"][0]
    saved = set((server.data_dir / "outputs" / "img2img-images").rglob("*.png")) - before
    assert len(saved) == 1 and Image.open(saved.pop()).size == (128, 64)  # the grown picture, not the pass's


def test_outpainting_mk2_needs_a_direction(api):
    r = api.post("/img2img", json=body(picture(64, 64), script_name="Outpainting mk2",
                                       script_args=["", 64, 8, []]))
    assert r.status_code == 422 and "direction" in r.json()["detail"], r.text


def test_script_names_match_without_case_and_unknown_ones_are_422_as_a1111(api):
    """A1111 compares lower-cased titles: any case names the script; an unknown name is its 422 in both tabs."""
    r = api.post("/txt2img", json=txt(prompt="a house|red", script_name="PROMPT Matrix",
                                      script_args=[False, False, "positive", "comma", 0]))
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3  # the grid, then both cells: the script ran
    r = api.post("/txt2img", json=txt(alwayson_scripts={"CONTROLNET": {"args": []}}))
    assert r.status_code == 200, r.text
    for route, request in (("/txt2img", txt), ("/img2img", lambda **kw: body(picture(64, 64), **kw))):
        r = api.post(route, json=request(script_name="No such script"))
        assert r.status_code == 422 and "Script 'No such script' not found" in r.json()["detail"], r.text
        r = api.post(route, json=request(alwayson_scripts={"No such script": {"args": []}}))
        assert r.status_code == 422 and "always on script No such script not found" in r.json()["detail"], r.text
