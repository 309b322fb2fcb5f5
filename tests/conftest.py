"""Shared fixtures: tiny real-architecture checkpoints (built once per run) and a running Easel server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests run the server and the test process side by side on few cores; one
# intra-op thread each avoids oversubscription (which slows torch ~100x here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a real browser (Playwright); `launch.py --run-tests` runs these "
                                       "after the others, one at a time")


def pytest_terminal_summary(terminalreporter):
    """The machine the suite ran on, at the end of the report (its speed explains the suite's time)."""
    from backend.engine.devices.cpu import cpu_description, cpu_model_name
    terminalreporter.write_line(f"CPU: {cpu_model_name()}, {cpu_description()}, {os.cpu_count()} logical CPUs")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Mark the browser tests (every test of a test_browser_* file, and the tests elsewhere that open a page) and
    give every test its pytest-xdist group: the browser tests one group (one worker runs them one after another,
    while the other workers run the rest), every other test its file's (a file's module-scoped servers start once)."""
    for item in items:
        module = getattr(item, "module", None)
        function = getattr(item, "function", None)
        if module is None:
            continue
        in_browser_file = module.__name__.rpartition(".")[2].startswith("test_browser_")
        opens_page = function is not None and "browser_page" in function.__code__.co_names
        if in_browser_file or opens_page:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.xdist_group("browser"))
        else:
            item.add_marker(pytest.mark.xdist_group(module.__name__))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1 / SDXL checkpoints in A1111 layout, written once per test session."""
    from model_factory import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-models")
    made = {}
    for key, family, fmt, inpaint in (("sd1", "sd1", "safetensors", False), ("sd1_ckpt", "sd1", "ckpt", False),
                                      ("sdxl", "sdxl", "safetensors", False), ("sd1_inpaint", "sd1", "safetensors", True)):
        path = folder / f"tiny-{key}.{fmt}"
        write_tiny_checkpoint(path, family, fmt=fmt, seed=1, inpaint=inpaint)
        made[key] = path
    return made


@pytest.fixture(scope="module")
def sd1(tiny_models):
    """The tiny SD 1.x checkpoint, loaded on the CPU in float32 (one per test module: tests may patch it)."""
    from backend.engine.model_loader import load_sd_model
    return load_sd_model(tiny_models["sd1"])


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    """The tiny SDXL checkpoint, loaded on the CPU in float32 (one per test module)."""
    from backend.engine.model_loader import load_sd_model
    return load_sd_model(tiny_models["sdxl"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, extra_args: list[str] | None = None, models: dict[str, Path] | None = None):
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ckpt_dir = data_dir / "models" / "Stable-diffusion"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name, path in (models or {}).items():
            target = ckpt_dir / path.name
            if not target.exists():
                os.link(path, target) if path.stat().st_dev == ckpt_dir.stat().st_dev else target.write_bytes(path.read_bytes())
        self.log_path = data_dir / "server.log"
        cmd = [sys.executable, str(ROOT / "app.py"), "--api", "--data-dir", str(data_dir), "--port", str(self.port),
               "--no-download-sd-model", *(extra_args or [])]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait(self, timeout: float = 180, auth: tuple[str, str] | None = None) -> None:
        """Until the API answers (`auth`: the --api-auth login it needs)."""
        import httpx
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(self.url + "/sdapi/v1/samplers", auth=auth, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self) -> "Server":
        """`with Server(...) as srv:` waits until it answers; leaving the block stops it (also when it never came up)."""
        try:
            self.wait()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_models):
    """A real Easel server (UI + API, real backend process) with the tiny checkpoints."""
    with Server(tmp_path_factory.mktemp("easel-data"), models=tiny_models) as srv:
        yield srv


@pytest.fixture()
def api(server):
    import httpx
    with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=600) as client:
        yield client
