"""img2img's "SD upscale" script: the tile split and feathered blend, the script's arguments, the job run directly
(progress over all tiles, Interrupt between tiles) and end to end through the HTTP API with the tiny SD1 checkpoint."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from backend.checkpoints import ModelFile
from backend.engine.devices import DevicePolicy
from backend.engine.loaded_model import LoadedModel
from backend.core.errors import UserError
from backend.core.infotext import parse_infotext
from backend.core.options import SETTINGS
from backend.engine.pipelines import img2img, sd_upscale
from backend.engine.pipelines.common import JobContext
from backend.postprocess import upscaler_catalog
from backend.core import request_checks
from backend.core.sampler_catalog import resolve_sampling
from backend.core.schemas import Img2ImgRequest
from test_api_img2img import body, images_of, picture

torch.set_num_threads(1)
CPU = torch.device("cpu")


# -- tiles ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, tile, overlap", [((128, 128), (64, 64), 16), ((200, 130), (64, 64), 0),
                                                 ((517, 301), (128, 96), 64), ((40, 30), (64, 64), 8),
                                                 ((128, 96), (64, 64), 60)])
def test_split_then_combine_gives_back_the_image(size, tile, overlap):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    grid, tiles = sd_upscale.split_tiles(img, *tile, overlap)
    assert all(t.size == tile for t in tiles) and len(tiles) == len(grid.xs) * len(grid.ys)
    for starts, length, side in ((grid.xs, size[0], tile[0]), (grid.ys, size[1], tile[1])):
        assert starts[0] == 0 and (starts[-1] + side == length or (len(starts) == 1 and length < side))
        assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    out = sd_upscale.combine_tiles(grid, tiles)
    assert out.size == size
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(img, dtype=np.int16)).max() <= 1


def test_the_overlap_is_feathered_linearly():
    grid, tiles = sd_upscale.split_tiles(Image.new("RGB", (112, 64)), 64, 64, 16)
    assert grid.xs == (0, 48)
    out = np.asarray(sd_upscale.combine_tiles(grid, [Image.new("RGB", (64, 64), (0, 0, 0)),
                                                     Image.new("RGB", (64, 64), (255, 255, 255))]))[:, :, 0].astype(int)
    assert (out[:, :48] == 0).all() and (out[:, 64:] == 255).all()
    ramp = out[0, 48:64]
    assert np.all(np.diff(ramp) > 0) and np.all(out == out[0])  # rises across the overlap, the same on every row
    assert np.abs(ramp - (np.arange(16) + 0.5) / 16 * 255).max() <= 1


# -- arguments ----------------------------------------------------------------------------------------------
def _req(**kw) -> Img2ImgRequest:
    return Img2ImgRequest(**{"prompt": "x", "width": 64, "height": 64, "script_name": "SD upscale", **kw})


def test_script_args_are_checked_with_clear_messages():
    args = request_checks.sd_upscale_args(_req(script_args=[None, 16, "Lanczos", 2]))
    assert (args.overlap, args.upscaler, args.scale) == (16, "Lanczos", 2.0)
    assert request_checks.sd_upscale_args(_req(script_args=["", 32, 1.0, 1.5])).upscaler == 1
    assert request_checks.sd_upscale_args(_req(script_name="Poor man's outpainting")) is None
    for script_args, words in (([None, 16, "Lanczos", 5], "scale factor must be between 1 and 4"),
                               ([None, 16, "Lanczos", 0.5], "scale factor must be between 1 and 4"),
                               ([None, 300, "Lanczos", 2], "overlap must be between 0 and 256"),
                               ([None, 64, "Lanczos", 2], "smaller than the tile size 64x64"),
                               ([None, 16, "Lanczos"], "must be [_unused, overlap, upscaler index or name, scale factor]"),
                               ([None, 16, None, 2], "the upscaler must be an index")):
        with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
            request_checks.check_img2img(_req(script_args=script_args))


def test_upscaler_by_index_or_name():
    assert upscaler_catalog.upscaler_name(1, None) == "Lanczos" and upscaler_catalog.upscaler_name("nearest", None) == "Nearest"
    with pytest.raises(UserError, match="index 9 is out of range"):
        upscaler_catalog.upscaler_name(9, None)
    with pytest.raises(UserError, match="Unknown upscaler 'Magic'"):
        upscaler_catalog.upscaler_name("Magic", None)


# -- the job, run directly --------------------------------------------------------------------------------------
class RecordingControl:
    """Counts steps and batches; presses Interrupt after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.steps, self.begun, self.jobs = stop_after, 0, [], []

    def interrupted(self) -> bool:
        return self.stop_after is not None and self.steps >= self.stop_after

    def skipped(self) -> bool:
        return False

    def clear_skip(self) -> None:
        pass

    def begin(self, job_count: int, total_steps: int) -> None:
        self.begun.append((job_count, total_steps))

    def set_job(self, job_no: int) -> None:
        self.jobs.append(job_no)

    def step(self, preview) -> None:
        self.steps += 1


@pytest.fixture(scope="module")
def placed_sd1(sd1):
    loaded = LoadedModel(sd1)
    DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32).place(loaded)
    return loaded


def context(loaded, ckpt, out_root, control) -> JobContext:
    options = {s.key: s.default for s in SETTINGS}
    options["live_previews_enable"] = False
    policy = DevicePolicy(device=CPU, dtype=torch.float32, vae_dtype=torch.float32, free_memory=lambda: 1 << 40)
    return JobContext(loaded=loaded, policy=policy, options=options, outputs_root=out_root,
                      checkpoint=ModelFile(ckpt.name, ckpt, sha256="0" * 64), vae=None, control=control,
                      sampling=resolve_sampling(_direct_req(), options["default_sampler"]))  # every run here: Euler


def _direct_req(**kw) -> Img2ImgRequest:
    return _req(steps=4, sampler_name="Euler", seed=7, denoising_strength=0.5, script_args=[None, 16, "Lanczos", 2], **kw)


def test_progress_covers_every_tile_and_only_the_result_is_saved(placed_sd1, tiny_models, tmp_path):
    control = RecordingControl()
    ctx = context(placed_sd1, tiny_models["sd1"], tmp_path, control)
    result = img2img.run(_direct_req(batch_size=2, n_iter=2), ctx, [picture(64, 64)], None)
    # 128x128 in 64px tiles with 16px overlap: 3 x 3 tiles, in 5 batches of up to 2, for each of the 2 batch counts
    steps_per_tile = 3  # int(0.5 * 4) + 1 sampler steps, as A1111 runs for denoising 0.5 of 4 steps
    assert control.begun == [(10, 10 * steps_per_tile)] and control.steps == 10 * steps_per_tile
    assert control.jobs == list(range(10))
    outputs = [o for o in result.images if not o.is_grid]
    assert len(result.images) == 2 and len(outputs) == 2 and not result.interrupted
    assert [o.seed for o in outputs] == [7, 8] and [parse_infotext(o.infotext)["Seed"] for o in outputs] == ["7", "8"]
    saved = sorted((tmp_path / "outputs" / "img2img-images").rglob("*.png"))
    assert len(saved) == 2 and all(Image.open(p).size == (128, 128) for p in saved)
    assert "SD upscale upscaler: Lanczos" in Image.open(saved[0]).info["parameters"]


def test_interrupt_stops_between_tiles(placed_sd1, tiny_models, tmp_path):
    control = RecordingControl(stop_after=2)  # during the first tile
    ctx = context(placed_sd1, tiny_models["sd1"], tmp_path, control)
    result = img2img.run(_direct_req(n_iter=2), ctx, [picture(64, 64)], None)
    assert result.interrupted and control.steps == 2 and control.jobs == [0]
    assert len(result.images) == 1  # the first tile redrawn, the others as upscaled
    assert Image.open(io.BytesIO(result.images[0].png)).size == (128, 128)


def test_sd_upscale_takes_no_mask(tmp_path):
    """Refused at the edge, before a job is queued: a mask, or a folder batch's mask folder (the engine trusts it)."""
    from backend.core.cmd_args import parse_args
    from backend.service import EaselService

    service = EaselService(parse_args(["--data-dir", str(tmp_path), "--no-download-sd-model"]))  # no backend started
    with pytest.raises(UserError, match="does not take a mask"):
        service.submit_img2img(_direct_req(), [picture(64, 64)], Image.new("L", (64, 64), 255))
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="does not take a mask"):
        service.submit_img2img_batch(_direct_req(), str(tmp_path / "in"), "", str(tmp_path / "masks"))
    request_checks.check_img2img_inputs(_direct_req(), 1, has_mask=False)  # without a mask it passes
    with pytest.raises(UserError, match="needs an init image"):
        service.submit_img2img(_direct_req(), [], None)


# -- through the API ----------------------------------------------------------------------------------------------
def test_sd_upscale_through_the_api(api, server):
    before = set((server.data_dir / "outputs").rglob("*.png"))
    r = api.post("/img2img", json=body(picture(64, 64), seed=555, save_images=True, steps=2,
                                       script_name="SD upscale", script_args=[None, 16, "Lanczos", 2]))
    out = images_of(r)
    assert len(out) == 1 and out[0].size == (128, 128)
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "SD upscale overlap: 16" in text and "SD upscale upscaler: Lanczos" in text
    params = parse_infotext(text)
    assert params["Seed"] == "555" and params["Denoising strength"] == "0.75"
    new = set((server.data_dir / "outputs").rglob("*.png")) - before
    assert len(new) == 1  # the result, not its tiles
    saved = new.pop()
    assert saved.parent.name == time.strftime("%Y-%m-%d") and saved.parent.parent.name == "img2img-images"
    assert Image.open(saved).size == (128, 128) and Image.open(saved).info["parameters"] == text


def test_sd_upscale_upscaler_by_index(api):
    names = [u["name"] for u in api.get("/upscalers").json()]
    r = api.post("/img2img", json=body(picture(64, 64), steps=1, script_name="SD upscale",
                                       script_args=["", 8, names.index("Nearest"), 1.5]))
    out = images_of(r)
    assert out[0].size == (96, 96)
    assert "SD upscale upscaler: Nearest" in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("script_args, words", [([None, 16, "Magic", 2], "Unknown upscaler 'Magic'"),
                                                ([None, 16, 999, 2], "upscaler index 999 is out of range"),
                                                ([None, 16, "Lanczos", 8], "scale factor must be between 1 and 4")])
def test_sd_upscale_errors_are_4xx(api, script_args, words):
    r = api.post("/img2img", json=body(picture(64, 64), steps=1, script_name="SD upscale", script_args=script_args))
    assert 400 <= r.status_code < 500 and words in r.json()["detail"], r.text


def test_unknown_script_lists_sd_upscale(api):
    r = api.post("/img2img", json=body(picture(64, 64), steps=1, script_name="Nope script"))
    assert r.status_code == 422 and "SD upscale" in r.json()["detail"]
