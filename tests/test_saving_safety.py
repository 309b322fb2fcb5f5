"""Nothing lost, nothing written where it must not be (issue 10, points 9 and 10).

- Images are written to a hidden temporary name and renamed: a failed write (full disk, an encoder error, a crash)
  never leaves a partial file under the final name nor a stray temporary file, and numbering goes on right.
- An output folder that cannot be written costs the files, not the images: the job returns them with a warning.
- A broken checkpoint is never the automatic default; asked for explicitly, it is a clear 4xx.
- Folder batches (img2img, Extras) read only files that are images by name and by content, and never write into
  a model folder.
"""
from __future__ import annotations

import base64
import errno
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import Server

GOOD = "tiny-sd1.safetensors"


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def picture(color=(200, 40, 40)) -> Image.Image:
    img = Image.new("RGB", (64, 64), color)
    img.paste((20, 20, 220), (16, 16, 48, 48))
    return img


# -- atomic saving ----------------------------------------------------------------------------------------------
class Crash(BaseException):
    """Stands for the process dying in the middle of a write (not an ordinary exception anybody catches)."""


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), Crash("killed")])
def test_a_failed_write_leaves_no_file_and_numbering_goes_on(tmp_path, monkeypatch, fmt, pil_format, failure):
    from backend.core.images import save_image

    first = save_image(picture(), tmp_path, seed=1, infotext="a\nSteps: 2", fmt=fmt)
    assert first.name == f"00000-1.{fmt}"
    original = Image.SAVE[pil_format]
    seen_during_write: list[list[str]] = []

    def encoder_that_fails_halfway(im, fp, filename):
        whole = io.BytesIO()
        original(im, whole, filename)
        data = whole.getvalue()
        fp.write(data[: len(data) // 2])
        fp.flush()
        seen_during_write.append(sorted(os.listdir(tmp_path)))
        raise failure

    monkeypatch.setitem(Image.SAVE, pil_format, encoder_that_fails_halfway)
    with pytest.raises(type(failure)):
        save_image(picture(), tmp_path, seed=2, infotext="b\nSteps: 2", fmt=fmt)
    # while the half-written data existed, it was not under a final name (nor counted as a number)
    assert seen_during_write and not [n for n in seen_during_write[0] if n[:1].isdigit() and n != first.name]
    assert sorted(os.listdir(tmp_path)) == [first.name]  # no partial file, no stray temporary file
    monkeypatch.setitem(Image.SAVE, pil_format, original)
    second = save_image(picture(), tmp_path, seed=3, infotext="c\nSteps: 2", fmt=fmt)
    assert second.name == f"00001-3.{fmt}"
    assert sorted(os.listdir(tmp_path)) == [first.name, second.name]
    with Image.open(second) as img:
        img.load()
        assert img.size == (64, 64)


def test_saved_files_get_the_usual_permissions(tmp_path):
    from backend.core.images import save_image

    path = save_image(picture(), tmp_path, seed=1, infotext=None)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_unwritable_folder_is_a_warning_not_a_failure(tmp_path):
    from backend.core.images import save_image_or_warn
    from backend.core.job_options import JobOptions
    from backend.engine.postprocess.extras import _save

    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder should be")
    warnings: list[str] = []
    assert save_image_or_warn(warnings, "image", picture(), blocker / "day", seed=1, infotext=None) is None
    assert save_image_or_warn(warnings, "image", picture(), blocker / "day", seed=2, infotext=None) is None
    assert len(warnings) == 1 and "Could not save the image" in warnings[0] and str(blocker) in warnings[0]
    # Extras (batch from directory into an output folder that became unusable): a warning, no exception
    extras_warnings: list[str] = []
    saved = _save(picture(), "", "Postprocess upscale by: 2", {"output_dir": blocker}, JobOptions.of({}), "x.png",
                  extras_warnings)
    assert saved is None and "Could not save" in extras_warnings[0]
    assert blocker.read_text().startswith("a file")


# -- folder batches: what counts as an image ----------------------------------------------------------------------
def _mixed_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    picture().save(folder / "real.png")
    (folder / "fake.png").write_text("this is text, not a picture")
    # plain-text PPM: text that Pillow would happily decode as a picture if it were handed over
    (folder / "plain.png").write_text("P3\n64 64\n255\n" + "255 0 0 " * 64 * 64 + "\n")
    (folder / "notes.txt").write_text("not an image")
    picture().save(folder / "picture.gif.txt", format="GIF")  # an image, but not by its name


def test_image_files_are_recognised_by_name_and_content(tmp_path):
    from backend.core.image_codec import folder_image_problem, open_folder_image

    _mixed_folder(tmp_path)
    picture().save(tmp_path / "misnamed.png", format="JPEG")  # an image under another image extension: fine
    verdicts = {p.name: folder_image_problem(p) for p in tmp_path.iterdir()}
    assert verdicts["real.png"] is None and verdicts["misnamed.png"] is None
    for name in ("fake.png", "plain.png", "notes.txt", "picture.gif.txt"):
        assert verdicts[name], name
    assert open_folder_image(tmp_path / "misnamed.png").size == (64, 64)


def test_extras_folder_batch_reads_only_images(tmp_path):
    from backend.engine.postprocess.extras import _inputs

    _mixed_folder(tmp_path)
    warnings: list[str] = []
    inputs = _inputs({"input_dir": tmp_path}, warnings)
    assert [i.name for i in inputs] == ["real.png"]
    assert inputs[0].load().size == (64, 64)
    for name in ("fake.png", "plain.png", "notes.txt", "picture.gif.txt"):
        assert any(name in w for w in warnings), (name, warnings)


def _service(tmp_path: Path, *flags: str):
    from backend.core.cmd_args import parse_args
    from backend.service import EaselService

    return EaselService(parse_args(["--data-dir", str(tmp_path / "data"), "--no-download-sd-model", *flags]))


def test_extras_folder_batch_never_writes_into_model_folders(tmp_path):
    from backend.core.errors import UserError
    from backend.postprocess.schemas import ExtrasRequest

    extra_lora = tmp_path / "my-loras"
    service = _service(tmp_path, "--lora-dir", str(extra_lora))
    data = tmp_path / "data"
    source = data / "in"
    _mixed_folder(source)
    for target in (data / "models", data / "models" / "ESRGAN", data / "models" / "Lora" / "new",
                   extra_lora / "out", data / "embeddings", "models/VAE", "outputs/../models/Stable-diffusion"):
        with pytest.raises(UserError) as err:
            service.postprocess.submit_extras_folder(ExtrasRequest(), str(source), str(target))
        assert err.value.status == 403 and "model folder" in err.value.message, target
        assert not (data / "models" / "Lora" / "new").exists() and not (extra_lora / "out").exists()
    # an ordinary output folder is accepted (and created)
    assert service._batch_folder("outputs/extras-batch", "Output", write=True) == (data / "outputs" / "extras-batch").resolve()
    assert (data / "outputs" / "extras-batch").is_dir()


def test_the_automatic_checkpoint_choice_passes_over_broken_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from backend.checkpoints import HashCache, ModelRegistry

    (tmp_path / "aaa-garbage.safetensors").write_bytes(os.urandom(2048))
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "aab-cut.safetensors"))
    data = (tmp_path / "aab-cut.safetensors").read_bytes()
    (tmp_path / "aab-cut.safetensors").write_bytes(data[: len(data) // 2])  # an incomplete download
    (tmp_path / "abc-not-a-checkpoint.ckpt").write_text("plain text")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b-loads-maybe.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "c-good.safetensors"))
    registry = ModelRegistry([tmp_path], [], HashCache(tmp_path / "hashes.json"))
    candidates, notes = registry.automatic_choice()
    assert [c.name for c in candidates] == ["b-loads-maybe.safetensors", "c-good.safetensors"]
    assert len(notes) == 3 and all(name in " ".join(notes) for name in
                                   ("aaa-garbage", "aab-cut", "abc-not-a-checkpoint"))
    # the backend reported that b- failed to load: passed over from now on, until the file changes or a refresh
    registry.mark_unloadable(candidates[0].path, "its keys match no supported layout")
    candidates, notes = registry.automatic_choice()
    assert [c.name for c in candidates] == ["c-good.safetensors"] and "its keys match no" in notes[-1]
    registry.refresh()
    assert registry.automatic_choice()[0][0].name == "b-loads-maybe.safetensors"


# -- through the server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def safety_server(tmp_path_factory, tiny_models):
    """A server whose checkpoint folder holds, sorted first, a file of garbage bytes and a well-formed
    .safetensors file that is no checkpoint, then the good tiny SD1 checkpoint; no checkpoint is selected."""
    data = tmp_path_factory.mktemp("saving-safety")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "aaa-broken.safetensors").write_bytes(os.urandom(4096))
    import torch
    from safetensors.torch import save_file
    save_file({"not_a_model.weight": torch.zeros(4, 4)}, str(ckpt_dir / "aab-no-model.safetensors"))
    with Server(data, models={"sd1": tiny_models["sd1"]}) as srv:
        yield srv


@pytest.fixture()
def sapi(safety_server):
    import httpx
    with httpx.Client(base_url=safety_server.url + "/sdapi/v1", timeout=600) as client:
        yield client


def _txt2img(**kw) -> dict:
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5}
    body.update(kw)
    return body


def test_a_broken_checkpoint_is_never_the_automatic_default(sapi, safety_server):
    # no checkpoint is selected: the setting stays empty; the options name the automatic choice by its title
    config = safety_server.data_dir / "config.json"
    assert (json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}).get("sd_model_checkpoint",
                                                                                          "") == ""
    titles = [m["title"] for m in sapi.get("/sd-models").json()]
    assert sapi.get("/options").json()["sd_model_checkpoint"] in titles
    for attempt in range(2):  # the second time the files are known to be broken: same outcome
        r = sapi.post("/txt2img", json=_txt2img())
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == "tiny-sd1", info
        warnings = " ".join(info.get("warnings", []))
        assert "aaa-broken.safetensors" in warnings and "aab-no-model.safetensors" in warnings, (attempt, warnings)
        assert len(r.json()["images"]) == 1
    # once the broken files are known, the options name the checkpoint the automatic choice loads
    assert sapi.get("/options").json()["sd_model_checkpoint"].startswith("tiny-sd1.safetensors [")
    # asked for explicitly, a broken checkpoint is the user's clear error, never swapped for another
    for name in ("aaa-broken.safetensors", "aab-no-model.safetensors"):
        r = sapi.post("/txt2img", json=_txt2img(override_settings={"sd_model_checkpoint": name}))
        assert 400 <= r.status_code < 500, r.text
        assert name in r.json()["detail"]
    # and that did not become the selection
    r = sapi.post("/txt2img", json=_txt2img())
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "tiny-sd1"


def test_selecting_a_checkpoint_that_does_not_load_keeps_the_previous_choice(sapi, safety_server):
    """As A1111: POST /options with a checkpoint that fails to load answers with its error, and the choice
    before it stays selected (for this API and for the page), so the jobs after it do not fail too."""
    good = next(m["title"] for m in sapi.get("/sd-models").json() if m["model_name"] == "tiny-sd1")
    assert sapi.post("/options", json={"sd_model_checkpoint": good}).status_code == 200
    try:
        r = sapi.post("/options", json={"sd_model_checkpoint": "aab-no-model.safetensors"})
        assert 400 <= r.status_code < 500 and "aab-no-model.safetensors" in r.json()["detail"], r.text
        # the same checkpoint, by its sd-models title (which carries the hash since the backend loaded it)
        assert sapi.get("/options").json()["sd_model_checkpoint"] == next(
            m["title"] for m in sapi.get("/sd-models").json() if m["model_name"] == "tiny-sd1")
        assert sapi.get("/options").json()["sd_model_checkpoint"].startswith(good.split(" [")[0])
        r = sapi.post("/txt2img", json=_txt2img())
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "tiny-sd1", r.text
    finally:
        assert sapi.post("/options", json={"sd_model_checkpoint": ""}).status_code == 200


def test_unwritable_output_folders_still_return_the_images(sapi, safety_server):
    blocked = safety_server.data_dir / "outputs" / "blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the output folder should be")
    overrides = {"sd_model_checkpoint": GOOD, "outdir_txt2img_samples": str(blocked),
                 "outdir_txt2img_grids": str(blocked / "grids")}
    r = sapi.post("/txt2img", json=_txt2img(save_images=True, batch_size=2, override_settings=overrides))
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3  # the grid and both images
    info = json.loads(r.json()["info"])
    warnings = info.get("warnings", [])
    assert any("Could not save the image" in w for w in warnings), warnings
    assert any("Could not save the grid" in w for w in warnings), warnings
    assert blocked.is_file()

    overrides = {"sd_model_checkpoint": GOOD, "outdir_img2img_samples": str(blocked),
                 "outdir_init_images": str(blocked / "init"), "save_init_img": True}
    r = sapi.post("/img2img", json=_txt2img(save_images=True, init_images=[b64(picture())], denoising_strength=0.5,
                                            override_settings=overrides))
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    warnings = json.loads(r.json()["info"]).get("warnings", [])
    assert any("Could not save the init image" in w for w in warnings), warnings
    assert any("Could not save the image" in w for w in warnings), warnings


def _batch(sapi, input_dir: Path, output_dir: Path):
    return sapi.post("/img2img-batch", json={**_txt2img(init_images=[], denoising_strength=0.5,
                                                        override_settings={"sd_model_checkpoint": GOOD}),
                                             "input_dir": str(input_dir), "output_dir": str(output_dir)})


def test_img2img_folder_batch_reads_only_images(sapi, safety_server):
    source = safety_server.data_dir / "batch-mixed"
    out = safety_server.data_dir / "outputs" / "batch-mixed-out"
    _mixed_folder(source)
    r = _batch(sapi, source, out)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    written = list(out.iterdir())
    assert len(written) == 1 and written[0].suffix == ".png"
    with Image.open(written[0]) as img:
        assert img.size == (64, 64)
    warnings = json.loads(r.json()["info"])["warnings"]
    for name in ("fake.png", "plain.png", "notes.txt", "picture.gif.txt"):
        assert any(name in w for w in warnings), (name, warnings)


def test_img2img_folder_batch_never_writes_into_model_folders(sapi, safety_server):
    source = safety_server.data_dir / "batch-in"
    _mixed_folder(source)
    models = safety_server.data_dir / "models"
    before = sorted(str(p) for p in models.rglob("*"))
    for target in (models, models / "Stable-diffusion", models / "Lora" / "new", models / "VAE" / ".." / "ESRGAN"):
        r = _batch(sapi, source, target)
        assert r.status_code == 403, (target, r.text)
        assert "model folder" in r.json()["detail"]
    assert sorted(str(p) for p in models.rglob("*")) == before
