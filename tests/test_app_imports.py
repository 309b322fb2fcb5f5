"""The app process (UI, API, service, backend client) does not import the engine.

Each check runs in a fresh interpreter, so that modules imported by other tests do not count: it imports the app's
modules, builds the web UI on a service over an empty data dir (the backend process is not started) and lists
what got loaded.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The engine: what only the backend process may import (pipelines, sampler math, schedules, device policy, model
# loading, the worker loop, the ControlNet and post-processing runtimes).
ENGINE_MODULES = ("backend.engine.pipelines", "backend.engine.samplers", "backend.engine.schedules", "backend.engine.devices", "backend.engine.worker",
                  "backend.engine.model_loader", "backend.engine.controlnet.runtime", "backend.engine.controlnet.apply",
                  "backend.engine.postprocess.runtime")

APP_MODULES = ("backend.service", "api.routes", "api.controlnet_routes", "api.postprocess_routes",
               "api.networks_routes", "ui.layout", "app")

_PROBE = """
import importlib, json, sys, tempfile
modules = json.loads(sys.argv[1])
for name in modules:
    importlib.import_module(name)
if sys.argv[2] == "build_ui":
    from backend.core.cmd_args import parse_args
    from backend.service import EaselService
    import ui.layout
    service = EaselService(parse_args(["--data-dir", tempfile.mkdtemp(), "--no-download-sd-model"]))
    ui.layout.build_ui(service)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_after(modules: tuple[str, ...], build_ui: bool) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(modules)), "build_ui" if build_ui else "-"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _engine(loaded: list[str]) -> list[str]:
    return [m for m in loaded if any(m == e or m.startswith(e + ".") for e in ENGINE_MODULES)]


def test_app_and_its_ui_load_no_engine_module():
    loaded = _loaded_after(APP_MODULES, build_ui=True)
    assert "backend.service" in loaded and "ui.layout" in loaded  # the probe did import the app
    assert _engine(loaded) == []


def test_service_and_generation_api_load_no_torch():
    # The service facade (with the request checks and the sampler catalog it uses) and the txt2img/img2img routes.
    loaded = _loaded_after(("backend.service", "api.routes"), build_ui=False)
    assert "backend.core.request_checks" in loaded and "backend.core.sampler_catalog" in loaded
    assert "torch" not in loaded
    assert _engine(loaded) == []
