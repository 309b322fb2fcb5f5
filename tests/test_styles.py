"""Prompt styles (styles.csv) as AUTOMATIC1111: the files, applying a style, editing, the API and a request's
`styles` (backend.core.styles)."""
from __future__ import annotations

import csv
import json

import pytest

from backend.core.errors import UserError
from backend.core.styles import StyleDatabase, merge_prompt, styled_prompts


def write_csv(path, rows, header=("name", "prompt", "negative_prompt")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_a_style_wraps_or_follows_the_prompt():
    assert merge_prompt("masterpiece, {prompt}, detailed", "a cat") == "masterpiece, a cat, detailed"
    assert merge_prompt("oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompt("oil painting", "  ") == "oil painting"
    assert merge_prompt("", "a cat") == "a cat"
    table = {"Wrap": ("best, {prompt}", "ugly, {prompt}"), "Oil": ("oil painting", "blurry")}
    # in the order given, to the prompt and the negative prompt alike; an unknown name applies nothing
    assert styled_prompts("a cat", "lowres", ["Wrap", "Oil", "Nope"], table) == (
        "best, a cat, oil painting", "ugly, lowres, blurry")
    assert styled_prompts("a cat", "lowres", ["Oil", "Wrap"], table) == ("best, a cat, oil painting",
                                                                       "ugly, lowres, blurry")
    assert styled_prompts("a cat", "", [], table) == ("a cat", "")


def test_files_globs_old_format_and_comments(tmp_path):
    write_csv(tmp_path / "styles.csv", [["Oil", "oil painting", "blurry"], ["#note", "x", ""], ["", "y", ""]])
    extra = tmp_path / "more"
    extra.mkdir()
    write_csv(extra / "a.csv", [["Old", "old style text"]], header=("name", "text"))
    write_csv(extra / "b.csv", [["Oil", "oil on canvas", ""]])  # a later file's style of the same name wins
    db = StyleDatabase([tmp_path / "styles.csv", str(extra / "*.csv")])
    assert db.names() == ["Oil", "Old"]
    assert db.get("Old").prompt == "old style text" and db.get("Old").negative_prompt == ""
    assert db.get("Oil").prompt == "oil on canvas"
    assert db.default_path == (tmp_path / "styles.csv").resolve()
    # a glob first: new styles go into its first match
    assert StyleDatabase([str(extra / "*.csv")]).default_path == (extra / "a.csv").resolve()


def test_save_edit_delete_keep_the_file_whole(tmp_path):
    path = tmp_path / "styles.csv"
    db = StyleDatabase([path])
    assert db.names() == []
    db.save_style("Comma, \"quoted\"", "a, {prompt}", "b\nc")
    db.save_style("Plain", "plain", "")
    again = StyleDatabase([path])  # read back from the file, quoting intact
    assert again.get("Comma, \"quoted\"").negative_prompt == "b\nc"
    db.save_style("Plain", "plainer", "neg")  # edit in place
    assert StyleDatabase([path]).get("Plain").prompt == "plainer"
    assert (tmp_path / "styles.csv.bak").exists()
    db.delete_style("Comma, \"quoted\"")
    assert StyleDatabase([path]).names() == ["Plain"]
    with pytest.raises(UserError):
        db.delete_style("Nope")
    with pytest.raises(UserError):
        db.save_style("  ", "x", "")
    assert not list(tmp_path.glob(".styles.csv.*"))  # no temporary file left behind


def test_a_file_changed_on_disk_is_read_again(tmp_path):
    path = tmp_path / "styles.csv"
    write_csv(path, [["One", "one", ""]])
    db = StyleDatabase([path])
    write_csv(path, [["One", "one", ""], ["Two", "two, {prompt}", ""]])
    assert db.names() == ["One", "Two"]
    db.save_style("Three", "three", "")  # the hand-added row survives a save from the UI
    assert StyleDatabase([path]).names() == ["One", "Two", "Three"]


def test_extract_gives_back_the_styles_of_a_pasted_prompt(tmp_path):
    path = tmp_path / "styles.csv"
    write_csv(path, [["Wrap", "best, {prompt}", "ugly, {prompt}"], ["Oil", "oil painting", "blurry"]])
    db = StyleDatabase([path])
    prompt, negative = db.apply("a cat", "lowres", ["Wrap", "Oil"])
    found, p, n = db.extract(prompt, negative)
    assert (sorted(found), p, n) == (["Oil", "Wrap"], "a cat", "lowres")
    assert db.apply(p, n, found) == (prompt, negative)  # either order gives this pair back
    prompt, negative = db.apply("a cat", "lowres", ["Oil"])
    assert db.extract(prompt, negative) == (["Oil"], "a cat", "lowres")
    assert db.extract("a dog", "") == ([], "a dog", "")


# -- through the server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def styles_server(tmp_path_factory, tiny_models):
    from conftest import Server

    data = tmp_path_factory.mktemp("styles-data")
    write_csv(data / "styles.csv", [["Wrap", "masterpiece, {prompt}", "ugly, {prompt}"], ["Oil", "oil painting", "blurry"]])
    with Server(data, models=tiny_models) as srv:
        yield srv


def test_api_lists_and_applies_styles(styles_server):
    import httpx

    with httpx.Client(base_url=styles_server.url + "/sdapi/v1", timeout=600) as api:
        assert api.get("/prompt-styles").json() == [
            {"name": "Wrap", "prompt": "masterpiece, {prompt}", "negative_prompt": "ugly, {prompt}"},
            {"name": "Oil", "prompt": "oil painting", "negative_prompt": "blurry"}]
        body = {"prompt": "a lighthouse", "negative_prompt": "lowres", "steps": 2, "width": 64, "height": 64,
                "seed": 3, "styles": ["Wrap", "Oil"], "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                "hr_prompt": "a tall lighthouse", "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
        r = api.post("/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_prompts"] == ["masterpiece, a lighthouse, oil painting"]
        assert info["all_negative_prompts"] == ["ugly, lowres, blurry"]
        assert info["prompt"] == "a lighthouse"  # the request's own, as A1111's Processed.prompt
        assert info["styles"] == ["Wrap", "Oil"]
        text = info["infotexts"][0]
        assert text.startswith("masterpiece, a lighthouse, oil painting\nNegative prompt: ugly, lowres, blurry\n")
        assert 'Hires prompt: "masterpiece, a tall lighthouse, oil painting"' in text
        # the same seed without styles is another picture: the styled prompt reached the sampler
        plain = api.post("/txt2img", json=dict(body, styles=[], enable_hr=False)).json()
        styled = api.post("/txt2img", json=dict(body, enable_hr=False)).json()
        assert plain["images"][0] != styled["images"][0]
        # a name that no file holds: applied as nothing (A1111), and said in the warnings
        r = api.post("/txt2img", json=dict(body, styles=["Nope"], enable_hr=False))
        info = json.loads(r.json()["info"])
        assert info["all_prompts"] == ["a lighthouse"]
        assert any("'Nope'" in w for w in info["warnings"]), info["warnings"]
        # img2img too
        import base64
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, format="PNG")
        r = api.post("/img2img", json={"init_images": [base64.b64encode(buf.getvalue()).decode()], "prompt": "sea",
                                       "styles": ["Oil"], "steps": 2, "width": 64, "height": 64,
                                       "denoising_strength": 0.5,
                                       "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["all_prompts"] == ["sea, oil painting"]


def test_xyz_plot_styles_axis(styles_server):
    import httpx

    from backend.core.infotext import parse_infotext
    from test_xyz_api import T, xyz_args

    with httpx.Client(base_url=styles_server.url + "/sdapi/v1", timeout=600) as api:
        body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 5, "styles": ["Oil"],
                "script_name": "X/Y/Z plot", "script_args": xyz_args(T["Styles"], "Wrap, Nothing here"),
                "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
        r = api.post("/txt2img", json=body)
        assert r.status_code == 422, r.text  # an unknown style in an axis: refused before any image, naming it
        assert "Nothing here" in r.text and "Styles" in r.text
        # the values dropdown offers the styles
        info = next(i for i in api.get("/script-info").json() if i["name"] == "x/y/z plot" and not i["is_img2img"])
        assert info["args"][0]["choices"][T["Styles"]] == "Styles"
        r = api.post("/txt2img", json=dict(body, script_args=xyz_args(T["Styles"], '"Wrap,Oil", Wrap')))
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        prompts = [t.split("\n")[0] for t in info["infotexts"][1:]]
        # each cell: the request's styles (Oil), then the cell's, applied in that order
        assert prompts == ["masterpiece, a lighthouse, oil painting, oil painting", "masterpiece, a lighthouse, oil painting"]
        assert parse_infotext(info["infotexts"][0])["X Type"] == "Styles"
