"""Upscalers: the registry over the model folders, spandrel loading of the real file layouts, exact output sizes,
tiled inference that agrees with untiled, image modes, bad files and size limits."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.core.cmd_args import parse_args
from backend.engine.devices import DevicePolicy
from backend.core.errors import UserError
from backend.core.paths import DataPaths
from backend.engine.postprocess import upscalers as up
from backend.postprocess import upscaler_catalog as catalog
from backend.engine.postprocess.model_files import LoadedModel, load_model
from backend.engine.postprocess.runtime import DEVICE_PARTS, PostprocessRuntime
from postprocess_factory import link_models, write_test_models

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sr_files(tmp_path_factory) -> dict[str, Path]:
    return write_test_models(tmp_path_factory.getbasetemp() / "postprocess-models", ("rrdb", "compact", "esrgan_old"))


def cpu_runtime(paths: DataPaths) -> PostprocessRuntime:
    cpu = torch.device("cpu")
    return PostprocessRuntime(paths, policies={part: DevicePolicy(device=cpu, dtype=torch.float32, vae_dtype=torch.float32)
                                               for part in DEVICE_PARTS})


@pytest.fixture()
def paths(tmp_path, sr_files) -> DataPaths:
    p = DataPaths.from_args(parse_args(["--data-dir", str(tmp_path)]))
    p.ensure_folders()
    link_models(sr_files, p.models_dir)
    return p


def photo(width: int = 96, height: int = 72) -> Image.Image:
    import skimage.data
    return Image.fromarray(skimage.data.astronaut()).crop((150, 40, 150 + width, 40 + height))


def test_registry_lists_builtins_and_model_files_by_a1111_names(paths):
    reg = catalog.UpscalerRegistry.from_paths(paths)
    names = reg.names()
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    for name in ("R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "4x-Tiny", "R-ESRGAN 4x+ Anime6B"):
        assert name in names
    present = reg.find("R-ESRGAN 4x+")
    assert present.path.is_file() and present.family == "RealESRGAN" and present.scale == 4
    offered = reg.find("R-ESRGAN 4x+ Anime6B")  # A1111's default, downloaded on first use
    assert not offered.path.exists() and offered.url.endswith("RealESRGAN_x4plus_anime_6B.pth")
    assert reg.find("4x-tiny").name == "4x-Tiny"  # case-insensitive
    assert reg.find("RealESRGAN_x4plus.pth").name == "R-ESRGAN 4x+"  # by file name, as some clients send
    with pytest.raises(UserError, match="Unknown upscaler 'Magic'.*Available: None, Lanczos"):
        reg.find("Magic")
    api = present.as_api()
    assert set(api) == {"name", "model_name", "model_path", "model_url", "scale"}


def test_model_path_flags_add_folders(tmp_path, sr_files):
    extra = tmp_path / "elsewhere"
    target = extra / "2x_Other.pth"
    target.parent.mkdir()
    target.write_bytes(sr_files["compact"].read_bytes())
    args = parse_args(["--data-dir", str(tmp_path / "data"), "--esrgan-models-path", str(extra),
                       "--realesrgan-models-path", str(tmp_path / "more")])
    paths = DataPaths.from_args(args)
    reg = catalog.UpscalerRegistry.from_paths(paths)
    found = reg.find("2x_Other")
    assert found.path == target.resolve() and found.family == "ESRGAN" and found.scale == 2
    assert paths.realesrgan_dirs[-1] == (tmp_path / "more").resolve()


def test_scale_from_file_names():
    assert catalog.scale_from_name("4x-UltraSharp") == 4
    assert catalog.scale_from_name("RealESRGAN_x2plus") == 2
    assert catalog.scale_from_name("DAT_x3") == 3
    assert catalog.scale_from_name("1x_ReFocus") == 1
    assert catalog.scale_from_name("mystery") == 4


@pytest.mark.parametrize("key,arch", [("rrdb", "ESRGAN"), ("compact", "RealESRGAN Compact"), ("esrgan_old", "ESRGAN")])
def test_spandrel_loads_each_real_layout(sr_files, key, arch):
    model = load_model(sr_files[key], "upscaler")
    assert model.architecture.name == arch
    assert model.scale == 4 and model.purpose == "SR"


def test_same_weights_in_both_esrgan_layouts_give_the_same_pixels(sr_files):
    """basicsr's layout (RealESRGAN_x4plus.pth, params_ema) and the original ESRGAN one (.safetensors)."""
    img = np.asarray(photo(40, 32))
    outs = []
    for key in ("rrdb", "esrgan_old"):
        m = load_model(sr_files[key], "upscaler")
        outs.append(up.run_model(LoadedModel(m, sr_files[key], "upscaler", torch.device("cpu"), torch.float32), img, tile=0))
    assert outs[0].shape == (128, 160, 3)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "4x-Tiny", "Lanczos", "Nearest", "None"])
@pytest.mark.parametrize("scale", [4, 2.5])
def test_upscale_gives_exactly_the_scaled_size(paths, name, scale):
    runtime = cpu_runtime(paths)
    image = photo(37, 23)
    out = up.upscale(image, runtime.upscalers().find(name), scale, load=runtime.load_upscaler, tile=16, overlap=4)
    assert out.size == (round(37 * scale), round(23 * scale))
    assert out.mode == "RGB"


def test_scale_above_the_model_runs_it_again(paths):
    runtime = cpu_runtime(paths)
    assert up.model_passes(20, 10, 8, 4) == 2 and up.model_passes(20, 10, 1, 4) == 1 and up.model_passes(20, 10, 0.5, 4) == 0
    ticks = []
    out = up.upscale(photo(20, 10), runtime.upscalers().find("R-ESRGAN General 4xV3"), 8, load=runtime.load_upscaler,
                     tile=0, on_tile=lambda: ticks.append(1))
    assert out.size == (160, 80) and len(ticks) == 2


def test_model_output_resembles_the_input(paths):
    """The random nets are built to pass colours through: the result is the picture, larger, not noise."""
    runtime = cpu_runtime(paths)
    image = photo(48, 40)
    out = up.upscale(image, runtime.upscalers().find("R-ESRGAN General 4xV3"), 4, load=runtime.load_upscaler)
    ref = np.asarray(image.resize(out.size, Image.Resampling.NEAREST), dtype=np.float64)
    assert np.abs(np.asarray(out, dtype=np.float64) - ref).mean() < 12


def _seam_mask(length: int, tile: int, scale: int, margin: int) -> np.ndarray:
    """True where an output row/column is at least `margin` output pixels away from every tile seam."""
    far = np.ones(length * scale, dtype=bool)
    for start, _end in up.tile_spans(length, tile)[1:]:
        far[max(0, start * scale - margin):start * scale + margin] = False
    return far


@pytest.mark.parametrize("key", ["rrdb", "compact"])
def test_tiled_and_untiled_agree_away_from_the_seams(sr_files, key):
    model = load_model(sr_files[key], "upscaler")
    loaded = LoadedModel(model, sr_files[key], "upscaler", torch.device("cpu"), torch.float32)
    img = np.asarray(photo(120, 100))
    whole = up.run_model(loaded, img, tile=0).astype(np.int16)
    tiled = up.run_model(loaded, img, tile=48, overlap=2).astype(np.int16)
    assert len(up.tile_spans(120, 48)) == 3 and len(up.tile_spans(100, 48)) == 3
    diff = np.abs(whole - tiled).max(axis=2)
    far = np.outer(_seam_mask(100, 48, 4, 24), _seam_mask(120, 48, 4, 24))
    assert diff[far].max() <= 1, "tiling changed pixels far from the seams"
    assert diff.mean() < 1.0
    # with an overlap wider than the net's receptive field the tiles see all they need: the same result
    covered = up.run_model(loaded, img, tile=48, overlap=24).astype(np.int16)
    assert np.abs(whole - covered).max() <= 1


def test_tile_spans_cover_the_image_evenly():
    spans = up.tile_spans(2048, 192)
    assert spans[0][0] == 0 and spans[-1][1] == 2048
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(e - s for s, e in spans) <= 192 and min(e - s for s, e in spans) >= 170
    assert up.tile_spans(100, 0) == [(0, 100)] and up.tile_spans(100, 192) == [(0, 100)]


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "I;16", "P"])
def test_grayscale_alpha_16bit_and_palette_images(paths, mode):
    runtime = cpu_runtime(paths)
    base = photo(30, 20)
    if mode == "RGBA":
        image = base.copy()
        alpha = Image.linear_gradient("L").resize(base.size)
        image.putalpha(alpha)
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype="<u2") * 257)
    elif mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = base.convert(mode)
    out = up.upscale(image, runtime.upscalers().find("R-ESRGAN 4x+"), 2, load=runtime.load_upscaler, tile=0)
    assert out.size == (60, 40)
    expected_mode = {"RGBA": "RGBA", "L": "L", "LA": "LA", "I;16": "L", "P": "RGB"}[mode]
    assert out.mode == expected_mode
    if mode == "RGBA":  # the alpha channel is resized beside the model's colours
        ref = np.asarray(alpha.resize((60, 40), Image.Resampling.LANCZOS), dtype=np.int16)
        assert np.abs(np.asarray(out.getchannel("A"), dtype=np.int16) - ref).max() <= 1
    if mode == "I;16":  # the 16-bit range is mapped to 8 bits, not clipped
        assert np.asarray(out).max() > 150


def test_bad_model_files_give_clear_errors_naming_them(paths, tmp_path):
    folder = paths.esrgan_dirs[0]
    broken = folder / "broken.pth"
    broken.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="broken.pth.*corrupt"):
        load_model(broken, "upscaler")
    foreign = folder / "4x_foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"encoder.weight": torch.zeros(3, 3), "decoder.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(UserError, match="4x_foreign.safetensors is not a model architecture"):
        load_model(foreign, "upscaler")
    unsafe = folder / "4x_unsafe.pth"
    with open(unsafe, "wb") as f:
        pickle.dump({"model": ValueError("not a tensor")}, f)
    with pytest.raises(UserError, match="4x_unsafe.pth"):
        load_model(unsafe, "upscaler")
    empty = folder / "4x_empty.pth"
    torch.save({"params": {}}, empty)
    with pytest.raises(UserError, match="4x_empty.pth"):
        load_model(empty, "upscaler")
    # through the registry and the cache, as a job would meet it
    runtime = cpu_runtime(paths)
    with pytest.raises(UserError, match="broken.pth"):
        up.upscale(photo(8, 8), runtime.upscalers().find("broken"), 2, load=runtime.load_upscaler)


def test_missing_download_offline_is_a_clear_error(paths, monkeypatch):
    import backend.downloads
    monkeypatch.setattr(backend.downloads, "network_available", lambda url, timeout=3.0: False)
    runtime = cpu_runtime(paths)
    with pytest.raises(UserError, match="not downloaded yet and there is no internet connection.*RealESRGAN"):
        up.upscale(photo(8, 8), runtime.upscalers().find("R-ESRGAN 4x+ Anime6B"), 2, load=runtime.load_upscaler)


def test_huge_outputs_are_refused_with_the_limit(paths):
    runtime = cpu_runtime(paths)
    image = Image.new("RGB", (2100, 1200))
    with pytest.raises(UserError, match="16800x9600, over Easel's limit of 16384 pixels") as err:
        up.upscale(image, runtime.upscalers().find("R-ESRGAN 4x+"), 8, load=runtime.load_upscaler)
    assert err.value.status == 413


def test_2048_upscales_x4_in_tiles_with_bounded_memory(tmp_path):
    """A 2048x2048 picture becomes 8192x8192 while memory grows by little more than the output itself."""
    script = f"""
import json, resource, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from postprocess_factory import write_compact
from backend.engine.postprocess.model_files import LoadedModel, load_model
from backend.engine.postprocess.upscalers import run_model
path = write_compact(Path({str(tmp_path)!r}) / "realesr-general-x4v3.pth", num_feat=4, num_conv=1)
loaded = LoadedModel(load_model(path, "upscaler"), path, "upscaler", torch.device("cpu"), torch.float32)
img = (np.random.default_rng(0).random((2048, 2048, 3)) * 255).astype(np.uint8)
run_model(loaded, img[:64, :64], tile=192, overlap=8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = run_model(loaded, img, tile=192, overlap=8)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"shape": list(out.shape), "grew_mb": (after - before) / 1024, "std": float(out[::64, ::64].std())}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [8192, 8192, 3]
    assert report["std"] > 20  # a real picture came out, not a blank canvas
    # the output alone is 192 MiB; untiled, the net's last layer alone would need 3 GiB
    assert report["grew_mb"] < 600, report


def test_models_are_cached_between_jobs(paths):
    runtime = cpu_runtime(paths)
    entry = runtime.upscalers().find("R-ESRGAN 4x+")
    first = runtime.load_upscaler(entry)
    assert runtime.load_upscaler(entry) is first and runtime.cache.loads == 1
    runtime.load_upscaler(runtime.upscalers().find("4x-Tiny"))
    assert runtime.cache.loads == 2 and runtime.cache.cached() == ["RealESRGAN_x4plus.pth", "4x-Tiny.safetensors"]
    runtime.clear()
    assert runtime.cache.cached() == []


def test_use_cpu_names_the_postprocessing_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--data-dir", str(tmp_path), "--use-cpu", "esrgan", "codeformer"])
    runtime = PostprocessRuntime(DataPaths.from_args(args), args)
    assert runtime.policies["esrgan"].device.type == "cpu"
    assert runtime.policies["codeformer"].device.type == "cpu"
    assert runtime.policies["gfpgan"].device.type == "cuda"


class _Control:
    def __init__(self):
        self.steps, self.total, self.jobs = 0, 0, 0

    def interrupted(self):
        return False

    def begin(self, job_count, total_steps):
        self.jobs, self.total = job_count, total_steps

    def set_job(self, _n):
        pass

    def step(self, _preview):
        self.steps += 1


def test_extras_batch_from_directory_keeps_names_and_records_steps(paths, tmp_path):
    from backend.engine.postprocess.extras import run_extras_job
    from backend.postprocess.schemas import ExtrasRequest

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    photo(30, 20).save(src / "first.png")
    photo(16, 16).convert("L").save(src / "second.jpg")
    (src / "broken.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("ignored")
    req = ExtrasRequest(upscaler_1="R-ESRGAN General 4xV3", upscaling_resize=2)
    control = _Control()
    payload = {"request": req, "options": {"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4}, "data_dir": tmp_path,
               "save": True, "images": [], "input_dir": src, "output_dir": dst}
    result = run_extras_job(payload, cpu_runtime(paths), control)
    assert sorted(p.name for p in dst.iterdir()) == ["first.png", "second.png"]
    assert [w for w in result.warnings if w.startswith("Skipped broken.png")]
    with Image.open(dst / "first.png") as img:
        assert img.size == (60, 40)
        assert img.info["parameters"] == "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN General 4xV3"
    # broken.png is left out before the job starts (not an image by its content), so two images make the job
    assert control.jobs == 2 and control.steps == control.total > 0  # one progress step per tile
    again = run_extras_job(payload, cpu_runtime(paths), _Control())  # a second run never overwrites
    assert len(again.images) == 2 and (dst / "first-1.png").exists()
