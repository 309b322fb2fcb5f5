"""Live previews by the setting `show_progress_type` (A1111's Approx NN, Approx cheap, TAESD, Full): the preview
networks from their files in the models folder (tiny random weights in the real formats here), the offline
fallback, and the previews a running job shows through /sdapi/v1/progress."""
from __future__ import annotations

import base64
import io
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.engine import previews
from backend.engine.previews import PreviewDecoders, VAEApprox, cheap_rgb, make_preview, taesd_decoder, to_picture

torch.set_num_threads(1)
METHODS = ("Approx NN", "Approx cheap", "TAESD", "Full")


def write_preview_files(models_dir: Path) -> None:
    """model.pt / vaeapprox-sdxl.pt (A1111's VAE approximation) in models/VAE-approx and TAESD's decoders in
    models/VAE-taesd, with random weights, saved as their published files are (a plain state dict)."""
    torch.manual_seed(0)
    for folder, names, build in ((models_dir / "VAE-approx", ("model.pt", "vaeapprox-sdxl.pt"), VAEApprox),
                                 (models_dir / "VAE-taesd", ("taesd_decoder.pth", "taesdxl_decoder.pth"), taesd_decoder)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (folder / name).exists():
                torch.save(build().state_dict(), folder / name)


def test_the_networks_have_the_published_files_key_names():
    approx = VAEApprox().state_dict()
    assert sorted(approx) == sorted(f"conv{i}.{p}" for i in range(1, 9) for p in ("weight", "bias"))
    assert approx["conv1.weight"].shape == (8, 4, 7, 7) and approx["conv8.weight"].shape == (3, 8, 3, 3)
    taesd = taesd_decoder().state_dict()
    # madebyollin/taesd's decoder: a Sequential; blocks' convolutions at conv.0/2/4; bias-free upsampling convs
    assert {"1.weight", "1.bias", "3.conv.0.weight", "3.conv.4.bias", "7.weight", "12.weight", "17.weight",
            "18.conv.2.weight", "19.weight", "19.bias"} <= set(taesd)
    assert "7.bias" not in taesd and taesd["19.weight"].shape == (3, 64, 3, 3) and taesd["1.weight"].shape == (64, 4, 3, 3)
    assert sum(v.numel() for v in taesd.values()) > 1_000_000  # 64 channels, 10 blocks


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_each_method_makes_a_picture_of_the_pass_size(tmp_path, family):
    write_preview_files(tmp_path)
    decoders = PreviewDecoders(tmp_path, allow_download=False)
    latent = torch.randn(2, 4, 12, 10)
    full_calls = []

    def full(first):
        full_calls.append(first.shape)
        return Image.new("RGB", (first.shape[-1] * 8, first.shape[-2] * 8), (1, 2, 3))

    shown = {m: make_preview(m, family, latent, 80, 96, decoders, full) for m in METHODS}
    for method, img in shown.items():
        assert img.size == (80, 96), method
    assert full_calls == [(1, 4, 12, 10)] and shown["Full"].getpixel((0, 0)) == (1, 2, 3)
    arrays = {m: np.asarray(img) for m, img in shown.items()}
    assert not np.array_equal(arrays["Approx NN"], arrays["Approx cheap"])
    assert not np.array_equal(arrays["TAESD"], arrays["Approx cheap"])
    # the networks' own outputs: Approx NN twice the latent's size, TAESD eight times
    assert decoders.rgb("Approx NN", family, latent[0]).shape == (3, 24, 20)
    assert decoders.rgb("TAESD", family, latent[0]).shape == (3, 96, 80)
    assert len(decoders._nets) == 2  # loaded once, kept
    # SD1 and SDXL use their own files and cheap factors
    other = "sdxl" if family == "sd1" else "sd1"
    assert not torch.equal(cheap_rgb(latent[0], family), cheap_rgb(latent[0], other))


@pytest.mark.parametrize("family, name", [("flux", "taef1_decoder.pth"), ("sd3", "taesd3_decoder.pth")])
def test_flux_and_sd3_previews_use_their_16_channel_taesd(tmp_path, family, name):
    folder = tmp_path / "VAE-taesd"
    folder.mkdir()
    torch.manual_seed(1)
    net = taesd_decoder(16)
    assert net.state_dict()["1.weight"].shape == (64, 16, 3, 3)  # taef1/taesd3: the first convolution reads 16
    torch.save(net.state_dict(), folder / name)
    decoders = PreviewDecoders(tmp_path, allow_download=False)
    latent = torch.randn(1, 16, 6, 5)
    img = make_preview("TAESD", family, latent, 40, 48, decoders, full=None)
    with torch.no_grad():
        expected = to_picture(net.eval()(latent)[0] * 2 - 1, 40, 48)  # every channel read, [0, 1] -> [-1, 1]
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    assert not np.array_equal(np.asarray(img), np.asarray(to_picture(cheap_rgb(latent[0], family), 40, 48)))
    # no Approx NN is published for them: Approx cheap, and nothing is looked for
    approx = make_preview("Approx NN", family, latent, 40, 48, decoders, full=None)
    assert np.array_equal(np.asarray(approx), np.asarray(to_picture(cheap_rgb(latent[0], family), 40, 48)))
    assert list(decoders._nets) == [name]


def test_a_missing_file_offline_falls_back_to_approx_cheap_with_one_log_line(tmp_path, monkeypatch, caplog):
    import backend.downloads as downloads
    asked = []
    monkeypatch.setattr(downloads, "network_available", lambda url, timeout=3.0: asked.append(url) or False)
    decoders = PreviewDecoders(tmp_path)  # downloads allowed, but offline
    latent = torch.randn(1, 4, 8, 8)
    cheap = to_picture(cheap_rgb(latent[0], "sd1"), 64, 64)
    with caplog.at_level(logging.WARNING, logger=previews.__name__):
        for _ in range(3):
            for method in ("Approx NN", "TAESD"):
                img = make_preview(method, "sd1", latent, 64, 64, decoders, full=None)
                assert np.array_equal(np.asarray(img), np.asarray(cheap)), method
    lines = [r.getMessage() for r in caplog.records if r.name == previews.__name__]
    assert len(lines) == 2 and "model.pt" in lines[0] and "taesd_decoder.pth" in lines[1]
    assert all("Approx cheap" in line for line in lines)
    assert asked == [previews.APPROX_NN_URL + "model.pt", previews.TAESD_URL + "taesd_decoder.pth"]  # tried once each


def test_a_damaged_file_falls_back_to_approx_cheap(tmp_path, caplog):
    (tmp_path / "VAE-approx").mkdir()
    (tmp_path / "VAE-approx" / "model.pt").write_bytes(b"not a torch file")
    decoders = PreviewDecoders(tmp_path, allow_download=False)
    latent = torch.randn(1, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger=previews.__name__):
        img = make_preview("Approx NN", "sd1", latent, 64, 64, decoders, full=None)
    assert np.array_equal(np.asarray(img), np.asarray(to_picture(cheap_rgb(latent[0], "sd1"), 64, 64)))
    assert any("model.pt" in r.getMessage() for r in caplog.records)


def test_a_missing_file_is_downloaded_into_the_models_folder(tmp_path, monkeypatch):
    import backend.downloads as downloads
    source = tmp_path / "published"
    write_preview_files(source)
    fetched = []

    def fake_download(url, dest, progress=None):
        fetched.append((url, dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / "VAE-approx" / dest.name).read_bytes())
        return dest

    monkeypatch.setattr(downloads, "network_available", lambda url, timeout=3.0: True)
    monkeypatch.setattr(downloads, "download_file", fake_download)
    models = tmp_path / "models"
    decoders = PreviewDecoders(models)
    assert decoders.network("Approx NN", "sdxl") is not None
    assert fetched == [(previews.APPROX_NN_URL + "vaeapprox-sdxl.pt", models / "VAE-approx" / "vaeapprox-sdxl.pt")]


# -- through the API ------------------------------------------------------------------------------

def job(**settings) -> dict:
    return {"prompt": "a lighthouse", "steps": 150, "width": 128, "height": 96, "seed": 4, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors", "show_progress_every_n_steps": 1,
                                  "live_previews_enable": True, **settings}}


def watch_progress(api, server, body: dict, seen_when, query: str = "") -> dict:
    """Run `body` as a txt2img job in a thread, poll /progress until `seen_when(progress)` holds, interrupt the job
    and return that progress body."""
    import httpx
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "r", httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=600)))
    thread.start()
    seen = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and thread.is_alive():
            p = api.get("/progress" + query).json()
            if seen_when(p):
                seen = p
                break
            time.sleep(0.05)
    finally:
        api.post("/interrupt")
        thread.join(120)
    assert not thread.is_alive()
    assert result["r"].status_code == 200, result["r"].text
    assert seen is not None, "the condition never held while the job ran"
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_each_method_shows_a_preview_of_the_image_size_during_a_job(api, server, method):
    write_preview_files(server.data_dir / "models")
    log_start = server.log_path.stat().st_size  # the session's server: earlier jobs may have had no files
    seen = watch_progress(api, server, job(show_progress_type=method), lambda p: p["current_image"])
    img = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert img.size == (128, 96)
    with open(server.log_path, "rb") as log:
        log.seek(log_start)
        assert b"previews use Approx cheap" not in log.read()  # the networks came from their files


def test_no_preview_when_live_previews_are_off_or_skipped(api, server):
    seen = watch_progress(api, server, job(live_previews_enable=False, show_progress_type="Approx cheap"),
                          lambda p: p["state"]["sampling_step"] >= 5)
    assert seen["current_image"] is None
    seen = watch_progress(api, server, job(show_progress_type="Approx cheap"),
                          lambda p: p["state"]["sampling_step"] >= 5, query="?skip_current_image=true")
    assert seen["current_image"] is None
    # every 4 steps: the preview comes once the fourth step is done
    seen = watch_progress(api, server, job(show_progress_type="Approx cheap", show_progress_every_n_steps=4),
                          lambda p: p["current_image"] is not None)
    assert seen["state"]["sampling_step"] >= 4
