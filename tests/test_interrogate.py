"""Interrogation: DeepDanbooru tags from a tiny model file in the real format, through the loading code, the
backend job and `POST /sdapi/v1/interrogate`; A1111's errors; the offline message."""
from __future__ import annotations

import base64
import io
import json
import os

import pytest
import torch
from PIL import Image

from backend.core.errors import UserError
from backend.core.job_options import JobOptions
from interrogate_factory import (BLIP_WORDS, CATEGORIES, TAG_WEIGHTS, write_blip_vocab, write_categories,
                                  write_tiny_blip, write_tiny_clip, write_tiny_deepbooru)

# The tiny model's tags at the default settings (threshold 0.5, alphabetical, spaces, escaped brackets); the
# "rating:" tag scores high but is never returned, "cat" and "dog" score below the threshold.
DEFAULT_CAPTION = r"blue \(sky\), hat, long hair, smile"


@pytest.fixture(scope="module")
def deepbooru_file(tmp_path_factory):
    return write_tiny_deepbooru(tmp_path_factory.mktemp("deepbooru") / "model-resnet_custom_v3.pt")


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    """models/ with a tiny BLIP (Salesforce layout) and its vocab.txt, a tiny OpenAI CLIP TorchScript file, and
    category files, as A1111 lays them out."""
    models = tmp_path_factory.mktemp("clip-models")
    vocab = write_blip_vocab(models / "BLIP" / "bert-base-uncased" / "vocab.txt")
    write_tiny_blip(models / "BLIP" / "model_base_caption_capfilt_large.pth", vocab)
    write_tiny_clip(models / "CLIP" / "ViT-L-14.pt")
    write_categories(models / "interrogate")
    return models


def picture(color=(200, 40, 60), size=(96, 64)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.paste((20, 180, 90), (10, 10, 50, 40))
    return img


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_file_loads_as_its_network_and_scores_in_the_known_order(deepbooru_file):
    from backend.engine.interrogate import deepbooru

    model = deepbooru.load_model(deepbooru_file)
    assert model.tags == list(TAG_WEIGHTS)
    scores = dict(zip(model.tags, deepbooru.scores(model, picture(), torch.device("cpu"), torch.float32)))
    assert scores["long_hair"] > scores["hat"] > scores["blue_(sky)"] > scores["smile"] > 0.5
    assert scores["cat"] < 0.01 and scores["dog"] < 0.01 and scores["rating:safe"] > 0.99


def test_tags_follow_the_settings(deepbooru_file):
    from backend.engine.interrogate import deepbooru

    model = deepbooru.load_model(deepbooru_file)
    probs = deepbooru.scores(model, picture(), torch.device("cpu"), torch.float32)
    assert deepbooru.tags_text(model.tags, probs, JobOptions()) == DEFAULT_CAPTION
    by_score = JobOptions({"deepbooru_sort_alpha": False, "deepbooru_use_spaces": False, "deepbooru_escape": False,
                           "deepbooru_filter_tags": "hat, long hair"})
    assert deepbooru.tags_text(model.tags, probs, by_score) == "blue_(sky), smile"
    ranked = deepbooru.tags_text(model.tags, probs, JobOptions({"interrogate_return_ranks": True,
                                                                "interrogate_deepbooru_score_threshold": 0.0}))
    parts = ranked.split(", ")
    assert [p.rsplit(":", 1)[0] for p in parts] == [r"(blue \(sky\)", "(cat", "(dog", "(hat", "(long hair", "(smile"]
    smile = dict(zip(model.tags, probs))["smile"]
    assert parts[-1] == f"(smile:{smile:.3f})"


def test_a_file_that_is_not_deepdanbooru_is_refused_by_name(tmp_path):
    from backend.engine.interrogate import deepbooru

    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="other.pt is not a DeepDanbooru model"):
        deepbooru.load_model(path)


def test_missing_model_offline_names_the_file_and_the_folder(tmp_path, monkeypatch):
    import backend.downloads
    from backend.engine.interrogate.job import run_interrogate_job
    from backend.engine.interrogate.runtime import InterrogateRuntime

    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    runtime = InterrogateRuntime(tmp_path / "models", torch.device("cpu"))
    with pytest.raises(UserError) as err:
        run_interrogate_job({"image": picture(), "model": "deepdanbooru", "options": {}}, runtime, _Control())
    assert err.value.status == 503
    assert "model-resnet_custom_v3.pt" in err.value.message
    assert str(tmp_path / "models" / "torch_deepdanbooru") in err.value.message
    assert "https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt" \
        in err.value.message


def test_the_job_keeps_the_network_loaded_between_jobs(deepbooru_file, tmp_path):
    from backend.engine.interrogate.job import run_interrogate_job
    from backend.engine.interrogate.runtime import InterrogateRuntime

    folder = tmp_path / "models" / "torch_deepdanbooru"
    folder.mkdir(parents=True)
    os.link(deepbooru_file, folder / "model-resnet_custom_v3.pt")
    runtime = InterrogateRuntime(tmp_path / "models", torch.device("cpu"))
    for _ in range(2):
        result = run_interrogate_job({"image": picture(), "model": "deepdanbooru", "options": {}}, runtime, _Control())
        assert result == {"caption": DEFAULT_CAPTION}
    assert runtime.loads == 1
    control = _Control(interrupted=True)
    with pytest.raises(UserError, match="interrupted") as err:
        run_interrogate_job({"image": picture(), "model": "deepdanbooru", "options": {}}, runtime, control)
    assert err.value.status == 409


def split_clip_caption(caption: str) -> tuple[list[str], list[str]]:
    """(the BLIP caption's words, the category matches after it)."""
    first, *matches = caption.split(", ")
    return first.split(), matches


def test_clip_caption_is_blip_text_then_the_best_line_of_each_category(clip_models):
    from backend.engine.interrogate.job import run_interrogate_job
    from backend.engine.interrogate.runtime import InterrogateRuntime

    runtime = InterrogateRuntime(clip_models, torch.device("cpu"))
    result = run_interrogate_job({"image": picture(), "model": "clip", "options": {}}, runtime, _Control())
    words, matches = split_clip_caption(result["caption"])
    assert words and set(words) <= set(BLIP_WORDS)  # decoded from the file's vocabulary, the prompt taken off
    assert 24 <= len(words) + 4 <= 48  # min/max length count the prompt's tokens ([DEC] a picture of) too
    # sorted by file: flavors.top3 (its 3 best), mediums (1), movements (1)
    assert len(matches) == 5
    assert set(matches[:3]) <= set(CATEGORIES["flavors.top3"]) and len(set(matches[:3])) == 3
    assert matches[3] in CATEGORIES["mediums"] and matches[4] in CATEGORIES["movements"]
    assert runtime.loads == 2  # BLIP and CLIP

    options = {"interrogate_return_ranks": True, "interrogate_clip_skip_categories": ["flavors"],
               "interrogate_clip_dict_limit": 1, "interrogate_clip_min_length": 5, "interrogate_clip_max_length": 8}
    words, matches = split_clip_caption(
        run_interrogate_job({"image": picture(), "model": "clip", "options": options}, runtime, _Control())["caption"])
    assert 1 <= len(words) <= 8 - 4
    # only each file's first line is ranked (dict limit 1): it takes the whole softmax
    assert matches == [f"({CATEGORIES['mediums'][0]}:1.000)", f"({CATEGORIES['movements'][0]}:1.000)"]
    assert runtime.loads == 2  # kept loaded between jobs


def test_interrupt_stops_a_clip_job_in_its_caption(clip_models):
    from backend.engine.interrogate.job import run_interrogate_job
    from backend.engine.interrogate.runtime import InterrogateRuntime

    control = _Control()
    calls = []

    def interrupted():  # pressed while BLIP generates: after its first tokens
        calls.append(1)
        return len(calls) > 3
    control.interrupted = interrupted
    runtime = InterrogateRuntime(clip_models, torch.device("cpu"))
    with pytest.raises(UserError, match="interrupted") as err:
        run_interrogate_job({"image": picture(), "model": "clip", "options": {}}, runtime, control)
    assert err.value.status == 409
    assert runtime.cached() == ["blip"]  # stopped in BLIP's generation: CLIP was never loaded


def test_clip_files_missing_offline_name_the_file_and_the_folder(tmp_path, monkeypatch):
    import backend.downloads
    from backend.engine.interrogate.job import run_interrogate_job
    from backend.engine.interrogate.runtime import InterrogateRuntime

    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    runtime = InterrogateRuntime(tmp_path / "models", torch.device("cpu"))
    with pytest.raises(UserError) as err:
        run_interrogate_job({"image": picture(), "model": "clip", "options": {}}, runtime, _Control())
    assert err.value.status == 503
    assert "model_base_caption_capfilt_large.pth" in err.value.message
    assert str(tmp_path / "models" / "BLIP") in err.value.message


def test_a_file_that_is_not_openai_clip_is_refused_by_name(tmp_path):
    from backend.engine.interrogate import clip

    path = tmp_path / "ViT-L-14.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="ViT-L-14.pt"):
        clip.load_model(path)


class _Control:
    def __init__(self, interrupted: bool = False):
        self._interrupted = interrupted

    def begin(self, job_count, total_steps):
        pass

    def step(self, preview):
        pass

    def interrupted(self):
        return self._interrupted


# -- through the API of a running server ---------------------------------------------------------------------------
def place_deepbooru(server, deepbooru_file) -> None:
    folder = server.data_dir / "models" / "torch_deepdanbooru"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model-resnet_custom_v3.pt"
    if not target.exists():
        os.link(deepbooru_file, target)


def test_api_interrogate_deepdanbooru(server, api, deepbooru_file):
    place_deepbooru(server, deepbooru_file)
    r = api.post("/interrogate", json={"image": b64(picture()), "model": "deepdanbooru"})
    assert r.status_code == 200, r.text
    assert r.json() == {"caption": DEFAULT_CAPTION}
    # a data URL, and the settings of the server (A1111's keys through /options) change the tags
    assert api.post("/options", json={"deepbooru_sort_alpha": False, "interrogate_return_ranks": True,
                                      "deepbooru_filter_tags": "smile"}).status_code == 200
    try:
        r = api.post("/interrogate", json={"image": "data:image/png;base64," + b64(picture()), "model": "deepdanbooru"})
        assert r.status_code == 200, r.text
        tags = [part.split(":")[0] for part in r.json()["caption"].split(", ")]
        assert tags == ["(long hair", "(hat", r"(blue \(sky\)"]
    finally:
        api.post("/options", json={"deepbooru_sort_alpha": True, "interrogate_return_ranks": False,
                                   "deepbooru_filter_tags": ""})


def place_clip_models(server, clip_models) -> None:
    for path in clip_models.rglob("*"):
        if path.is_file():
            target = server.data_dir / "models" / path.relative_to(clip_models)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)


def test_api_interrogate_clip(server, api, clip_models):
    place_clip_models(server, clip_models)
    r = api.post("/interrogate", json={"image": b64(picture())})  # A1111's default model: clip
    assert r.status_code == 200, r.text
    words, matches = split_clip_caption(r.json()["caption"])
    assert words and set(words) <= set(BLIP_WORDS)
    assert len(matches) == 5 and matches[3] in CATEGORIES["mediums"]


def test_api_interrogate_errors_as_a1111(api):
    r = api.post("/interrogate", json={"model": "deepdanbooru"})
    assert r.status_code == 404 and r.json()["detail"] == "Image not found"
    r = api.post("/interrogate", json={"image": None, "model": "deepdanbooru"})
    assert r.status_code == 404 and r.json()["detail"] == "Image not found"
    r = api.post("/interrogate", json={"image": b64(picture()), "model": "wd14"})
    assert r.status_code == 404 and r.json()["detail"] == "Model not found"
    r = api.post("/interrogate", json={"image": "not base64!", "model": "deepdanbooru"})
    assert r.status_code == 400 and "image" in r.json()["detail"]


def test_loopback_appends_the_interrogated_prompt_at_each_loop(server, api, deepbooru_file):
    """A1111's Loopback "Append interrogated prompt at each iteration": each loop's prompt is the job's, then the
    caption of that loop's input picture (the tiny DeepDanbooru model's tags do not depend on the picture)."""
    from backend.core.infotext import parse_infotext
    from test_api_img2img import body
    place_deepbooru(server, deepbooru_file)
    r = api.post("/img2img", json=body(picture(size=(64, 64)), prompt="a lighthouse", steps=2,
                                       denoising_strength=0.6, script_name="Loopback",
                                       script_args=[2, 0.5, "Linear", "DeepBooru"]))
    assert r.status_code == 200, r.text
    infotexts = json.loads(r.json()["info"])["infotexts"]
    loops = [parse_infotext(t)["Prompt"] for t in infotexts if "Denoising strength" in parse_infotext(t)]
    assert loops and all(p == f"a lighthouse, {DEFAULT_CAPTION}" for p in loops), loops
