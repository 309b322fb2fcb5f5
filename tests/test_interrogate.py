"""Interrogation: DeepDanbooru tags from a tiny model file in the real format, through the loading code, the
backend job and `POST /sdapi/v1/interrogate`; A1111's errors; the offline message."""
from __future__ import annotations

import base64
import io
import os

import pytest
import torch
from PIL import Image

from backend.core.errors import UserError
from backend.core.job_options import JobOptions
from interrogate_factory import TAG_WEIGHTS, write_tiny_deepbooru

# The tiny model's tags at the default settings (threshold 0.5, alphabetical, spaces, escaped brackets); the
# "rating:" tag scores high but is never returned, "cat" and "dog" score below the threshold.
DEFAULT_CAPTION = r"blue \(sky\), hat, long hair, smile"


@pytest.fixture(scope="module")
def deepbooru_file(tmp_path_factory):
    return write_tiny_deepbooru(tmp_path_factory.mktemp("deepbooru") / "model-resnet_custom_v3.pt")


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


def test_api_interrogate_errors_as_a1111(api):
    r = api.post("/interrogate", json={"model": "deepdanbooru"})
    assert r.status_code == 404 and r.json()["detail"] == "Image not found"
    r = api.post("/interrogate", json={"image": None, "model": "deepdanbooru"})
    assert r.status_code == 404 and r.json()["detail"] == "Image not found"
    r = api.post("/interrogate", json={"image": b64(picture()), "model": "wd14"})
    assert r.status_code == 404 and r.json()["detail"] == "Model not found"
    r = api.post("/interrogate", json={"image": "not base64!", "model": "deepdanbooru"})
    assert r.status_code == 400 and "image" in r.json()["detail"]
