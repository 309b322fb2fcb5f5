"""The app process (UI, API, service, backend client) imports neither the engine nor torch.

The import checks run in a fresh interpreter, so that modules imported by other tests do not count: it imports
the app's modules, builds the web UI on a service over a data dir holding model files of every kind (the
backend process is not started), has the service read every catalog (checkpoints, ControlNet models and
the ones fitting the checkpoint, preprocessors, LoRAs, embeddings against the checkpoint's text encoders,
upscalers, face restorers) and check requests as it does before queueing them, then lists what got loaded.
The last check looks at a running app process (the `server` fixture): after it served a txt2img job, a
ControlNet detect, an Extras job and every list, no torch library is mapped into it (its backend child has one).
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# What only the backend process may import: the engine package, torch, and the libraries that run models.
FORBIDDEN = ("backend.engine", "torch", "diffusers", "transformers", "safetensors.torch", "spandrel")

APP_MODULES = ("backend.service", "api.routes", "api.controlnet_routes", "api.postprocess_routes",
               "api.networks_routes", "ui.layout", "app")

_PROBE = """
import importlib, json, sys
modules, mode, data_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
for name in modules:
    importlib.import_module(name)
if mode == "build_ui":
    from backend.core.cmd_args import parse_args
    from backend.core.schemas import Txt2ImgRequest
    from backend.service import EaselService
    import ui.layout
    service = EaselService(parse_args(["--data-dir", data_dir, "--no-download-sd-model"]))
    ui.layout.build_ui(service)
    seen = {}
    ckpts = service.registry.checkpoints
    seen["checkpoints"] = sorted(c.model_name for c in ckpts)
    seen["controlnets"] = service.controlnet.model_titles()
    seen["controlnets_by_checkpoint"] = {c.model_name: service.controlnet.model_titles(c) for c in ckpts}
    seen["control_types"] = sorted(service.controlnet.control_types())
    seen["modules"] = len(service.controlnet.module_names())
    seen["loras"] = [entry["name"] for entry in service.lora_list()]
    seen["text_dims"] = {c.model_name: service.networks.text_dims(c) for c in ckpts}
    seen["embeddings"] = {c.model_name: service.networks.embeddings_api(c) for c in ckpts}
    seen["upscalers"] = service.postprocess.upscaler_names()
    seen["face_restorers"] = [f["name"] for f in service.postprocess.face_restorers()]
    service.postprocess.check_hires_upscaler(Txt2ImgRequest(enable_hr=True, hr_upscaler="Lanczos"))
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    units = service.controlnet.units_for_job({"controlnet": {"args": [{"enabled": True, "module": "canny",
                                                                        "model": "None", "image": image}]}}, img2img=False)
    seen["units"] = len(units)
    print("SEEN " + json.dumps(seen))
print(json.dumps(sorted(sys.modules)))
"""


def _probe(modules: tuple[str, ...], build_ui: bool, data_dir: Path) -> tuple[list[str], dict]:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(modules)), "build_ui" if build_ui else "-",
                          str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    seen = next((json.loads(line[5:]) for line in lines if line.startswith("SEEN ")), {})
    return json.loads(lines[-1]), seen


def _forbidden(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_models) -> Path:
    """A data dir with a model file of every kind the app lists (written here, where torch is allowed)."""
    from controlnet_factory import write_tiny_controlnet
    from lora_factory import save_embedding, save_lora, simple_lora

    data = tmp_path_factory.mktemp("app-imports-data")
    models = data / "models"
    for sub in ("Stable-diffusion", "ControlNet", "Lora", "ESRGAN"):
        (models / sub).mkdir(parents=True)
    for key in ("sd1", "sd1_ckpt", "sdxl"):
        (models / "Stable-diffusion" / tiny_models[key].name).write_bytes(tiny_models[key].read_bytes())
    write_tiny_controlnet(models / "ControlNet" / "control_tiny_sd15.pth", "sd1")
    save_lora(models / "Lora" / "tiny_style.safetensors", simple_lora("sd1"), family="sd1")
    save_embedding(data / "embeddings" / "fits.pt", torch.ones(2, 32))
    save_embedding(data / "embeddings" / "wide.safetensors", torch.ones(1, 48))
    torch.save({"params_ema": {"conv.weight": torch.zeros(1)}}, models / "ESRGAN" / "4x-Tiny.pth")
    return data


def test_app_and_its_ui_load_no_engine_module_and_no_torch(model_dir):
    loaded, seen = _probe(APP_MODULES, True, model_dir)
    assert "backend.service" in loaded and "ui.layout" in loaded  # the probe did import the app
    assert _forbidden(loaded) == []
    # ...and it did read every catalog, from the files' headers: the checks above would be empty words otherwise.
    sd1, ckpt, xl = (Path(p).stem for p in ("tiny-sd1", "tiny-sd1_ckpt", "tiny-sdxl"))
    assert seen["checkpoints"] == sorted([sd1, ckpt, xl])
    assert any(t.startswith("control_tiny_sd15 [") for t in seen["controlnets"])
    assert seen["controlnets_by_checkpoint"][sd1] == seen["controlnets_by_checkpoint"][ckpt] == seen["controlnets"]
    assert seen["controlnets_by_checkpoint"][xl] == ["None"]  # the SD 1.x ControlNet does not fit SDXL
    assert seen["text_dims"] == {sd1: [32], ckpt: [32], xl: [32, 64]}  # read from .safetensors and .ckpt headers
    assert sorted(seen["embeddings"][sd1]["loaded"]) == ["fits"] and sorted(seen["embeddings"][sd1]["skipped"]) == ["wide"]
    assert seen["embeddings"][sd1]["loaded"]["fits"]["vectors"] == 2
    assert seen["loras"] == ["tiny_style"] and "4x-Tiny" in seen["upscalers"]
    assert seen["face_restorers"] == ["CodeFormer", "GFPGAN"] and "Canny" in seen["control_types"]
    assert seen["modules"] > 20 and seen["units"] == 1


def test_service_and_generation_api_load_no_torch(tmp_path):
    # The service facade (with the request checks and the sampler catalog it uses) and the txt2img/img2img routes.
    loaded, _ = _probe(("backend.service", "api.routes"), False, tmp_path)
    assert "backend.core.request_checks" in loaded and "backend.core.sampler_catalog" in loaded
    assert _forbidden(loaded) == []


def _torch_libraries(pid: int) -> set[str]:
    """The torch shared libraries (libtorch*.so, libc10*.so) mapped into a process."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1].rsplit("/", 1)[-1] for line in maps.splitlines()
            if "/" in line and ("libtorch" in line.rsplit("/", 1)[-1] or "libc10" in line.rsplit("/", 1)[-1])}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_running_app_process_has_no_torch_mapped(server, api):
    import httpx
    import psutil

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    picture = base64.b64encode(buf.getvalue()).decode()
    r = api.post("/txt2img", json={"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 1})
    assert r.status_code == 200, r.text
    assert api.post("/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos",
                                                  "upscaling_resize": 2}).status_code == 200
    for path in ("/sd-models", "/loras", "/embeddings", "/upscalers", "/face-restorers", "/realesrgan-models",
                 "/samplers", "/options"):
        assert api.get(path).status_code == 200, path
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for path in ("/controlnet/model_list", "/controlnet/module_list", "/controlnet/control_types"):
            assert client.get(path).status_code == 200, path
        detect = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [picture],
                                                         "controlnet_processor_res": 64})
        assert detect.status_code == 200, detect.text
    backend = psutil.Process(server.proc.pid).children(recursive=True)
    assert backend and any(_torch_libraries(child.pid) for child in backend)  # the check sees torch where it is
    assert _torch_libraries(server.proc.pid) == set()
