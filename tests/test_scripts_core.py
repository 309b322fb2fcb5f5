"""The torch-free parts of selectable scripts: argument specs, Prompts from file's line options, grid legends."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from backend.core.errors import UserError
from backend.core.grid_legends import GridAnnotation, combination_labels, draw_grid_annotations
from backend.core.images import image_grid
from backend.core.prompt_file_lines import parse_line
from backend.core.scripts_catalog import SCRIPTS, ScriptCatalog


def test_defaults_fill_missing_trailing_args():
    spec = ScriptCatalog(SCRIPTS).find("LOOPBACK", "img2img")
    assert spec.check_args([8]) == [8, 0.5, "Linear", "None"]
    assert spec.check_args(["3", 0.25, "lazy"]) == [3, 0.25, "Lazy", "None"]  # coerced, choices without case


def test_index_radios_take_labels_or_indices():
    spec = ScriptCatalog(SCRIPTS).find("Poor man's outpainting", "img2img")
    assert spec.check_args([64, 4, "latent noise", "left"]) == [64, 4, 2, ["left"]]
    assert spec.check_args([64, 4, 1]) == [64, 4, 1, ["left", "right", "up", "down"]]
    with pytest.raises(UserError, match=r"script_args\[3\]: outpainting direction: 'sideways'"):
        spec.check_args([64, 4, 1, ["sideways"]])


def test_unknown_script_is_422_and_lists_the_tab():
    with pytest.raises(UserError) as err:
        ScriptCatalog(SCRIPTS).find("Loopback", "txt2img")
    assert err.value.status == 422 and "Prompt matrix" in err.value.message


def test_catalog_add_plugs_a_script_in():
    from dataclasses import replace
    catalog = ScriptCatalog(SCRIPTS)
    catalog.add(replace(SCRIPTS[0], title="X/Y/Z plot"))
    assert "x/y/z plot" in catalog.scripts_list()["txt2img"]


@pytest.mark.parametrize("line, expected", [
    ("a cat, sitting", {"prompt": "a cat, sitting"}),
    ('--prompt "a dog" --steps 10 --seed 5', {"prompt": "a dog", "steps": 10, "seed": 5}),
    ("--prompt a big dog --negative_prompt blurry ugly --cfg_scale 4.5", {"prompt": "a big dog",
                                                                          "negative_prompt": "blurry ugly",
                                                                          "cfg_scale": 4.5}),
    ("--tiling true --restore_faces no", {"tiling": True, "restore_faces": False}),
])
def test_line_options_parse_as_a1111(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize("line, words", [("--nope 1", "unknown commandline option: --nope"),
                                         ("--steps", "missing argument"), ("cat --steps 3", "must start with"),
                                         ("--sd_model x", "one checkpoint")])
def test_bad_line_options(line, words):
    with pytest.raises(ValueError, match=words):
        parse_line(line)


def test_legends_leave_the_cells_and_mark_inactive_parts():
    cells = [Image.new("RGB", (64, 64), (40 * i, 80, 120)) for i in range(4)]
    grid = image_grid(cells, rows=2)
    columns, rows = combination_labels(["red", "blue"])
    assert columns == [[GridAnnotation("red", False)], [GridAnnotation("red", True)]]
    assert rows == [[GridAnnotation("blue", False)], [GridAnnotation("blue", True)]]
    annotated = draw_grid_annotations(grid, 64, 64, columns, rows, margin=6)
    pad_left, pad_top = annotated.width - (128 + 6), annotated.height - (128 + 6)
    assert pad_left > 0 and pad_top > 0
    assert np.array_equal(np.asarray(annotated.crop((pad_left + 70, pad_top + 70, pad_left + 134, pad_top + 134))),
                          np.asarray(cells[3]))
    legend = np.asarray(annotated.crop((pad_left, 0, annotated.width, pad_top)))
    assert (legend < 60).all(axis=-1).any()  # the active label in black (anti-aliased)
    assert (legend == 153).all(axis=-1).any()  # the inactive one in grey, struck through


def test_list_arguments_for_multiselect_dropdowns():
    from backend.core.scripts_catalog import ScriptArg
    arg = ScriptArg("values", "X values", "list", [])
    assert arg.check(["Euler", "DDIM"], "X") == ["Euler", "DDIM"] and arg.check("Euler", "X") == ["Euler"]
    assert arg.check(None, "X") == [] and arg.check([1, 2.5], "X") == ["1", "2.5"]
    with pytest.raises(UserError, match="X must be a list of values"):
        arg.check([{"a": 1}], "X")


def test_api_accepts_wider_ranges_than_the_sliders_where_safe():
    spec = ScriptCatalog(SCRIPTS).find("Poor man's outpainting", "img2img")
    assert spec.check_args([512])[0] == 512  # A1111's API takes more than its 256-pixel slider
    info = next(i for i in ScriptCatalog(SCRIPTS).script_info() if i["name"] == "poor man's outpainting")
    assert info["args"][0]["maximum"] == 256
    with pytest.raises(UserError, match="between 8 and 2048"):
        spec.check_args([4096])
