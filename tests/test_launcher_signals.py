"""SIGTERM or SIGINT to `launch.py` stops everything it started: the app, the backend process, the port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import ROOT, _free_port

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT", "Ctrl+C"])
def test_signal_to_launcher_stops_the_whole_tree(tmp_path, sig, to_group):
    """`kill` reaches the launcher's pid only; Ctrl+C in a terminal reaches its whole process group."""
    port = _free_port()
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--skip-install", "--data-dir", str(tmp_path / "data"),
             "--port", str(port), "--no-download-sd-model"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # its own process group, as a terminal gives a command
            # and SIGINT's default action, as a terminal gives it: a pytest-xdist worker ignores SIGINT, and an
            # ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt handler)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while True:
            assert launcher.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.time() < deadline, "the UI did not start:\n" + log_path.read_text(errors="replace")[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        root = psutil.Process(launcher.pid)
        tree = [root, *root.children(recursive=True)]
        assert len(tree) >= 2, "expected the app and its backend process"

        if to_group:
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)  # to the launcher's pid only, as `kill` or a service manager does
        launcher.wait(timeout=20)
        deadline = time.time() + 10
        while time.time() < deadline and not all(_gone(p) for p in tree):
            time.sleep(0.2)
        left = [f"{p.pid} {p.name()}" for p in tree if not _gone(p)]
        assert not left, f"still running after {sig.name}: {left}"
        deadline = time.time() + 10
        while time.time() < deadline and not _port_free(port):
            time.sleep(0.2)
        assert _port_free(port), f"port {port} still taken after {sig.name}"
    finally:
        for p in tree:  # what a failed run left behind (already reparented: not our children any more)
            if not _gone(p):
                p.kill()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
