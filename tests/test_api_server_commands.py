"""AUTOMATIC1111's server commands behind --api-server-stop: POST /sdapi/v1/server-restart starts the app again
(in place: same process id, the API answers again), /server-stop shuts it down cleanly (backend stopped, exit code
0), /server-kill ends it at once; without the flag the routes do not exist (404). Also launch.py's restart loop
where app.py cannot re-execute itself (Windows)."""
from __future__ import annotations

import sys
import time

import httpx
import psutil

from conftest import Server

COMMANDS = ("/server-kill", "/server-restart", "/server-stop")


def test_server_commands_are_404_without_the_flag(api, server):
    for path in COMMANDS:
        r = api.post(path)
        assert r.status_code == 404, (path, r.status_code, r.text)
    assert server.proc.poll() is None
    assert "api_server_stop" in api.get("/cmd-flags").json()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` that have not ended (a zombie has ended: only its exit status waits to be read)."""
    _gone, alive = psutil.wait_procs(processes, timeout=60)
    running = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def answers(srv: Server) -> bool:
    try:
        return httpx.get(srv.url + "/sdapi/v1/samplers", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def restart(srv: Server) -> None:
    pid, backends = srv.proc.pid, psutil.Process(srv.proc.pid).children(recursive=True)
    assert backends, "no backend process"
    r = httpx.post(srv.url + "/sdapi/v1/server-restart", timeout=60)
    assert r.status_code == 200 and r.text == "Restarting.", r.text
    # the old backend process ends with the old app; the same process (exec'ed) serves again
    alive = still_running(backends)
    assert not alive, f"backend processes left running after the restart: {alive}"
    # the old app closed its web server before its backend stopped: what answers now is the new one
    wait_for(lambda: srv.proc.poll() is not None or answers(srv), 240, "the server did not come back")
    assert srv.proc.poll() is None and srv.proc.pid == pid
    assert psutil.Process(pid).children(recursive=True), "the restarted app has no backend process"


def test_restart_then_stop(tmp_path):
    srv = Server(tmp_path / "data", ["--api-server-stop"])
    try:
        srv.wait()
        restart(srv)
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        r = httpx.post(srv.url + "/sdapi/v1/server-stop", timeout=60)
        assert r.status_code == 200 and r.text == "Stopping.", r.text
        assert srv.proc.wait(timeout=120) == 0
        alive = still_running(children)
        assert not alive, f"processes left running after the stop: {alive}"
        assert not answers(srv)
    finally:
        srv.stop()


def test_api_only_restart_then_kill(tmp_path):
    srv = Server(tmp_path / "data", ["--api-server-stop", "--nowebui"])
    try:
        srv.wait()
        restart(srv)
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        r = httpx.post(srv.url + "/sdapi/v1/server-kill", timeout=60)
        assert r.status_code == 200 and r.text == "Killing.", r.text
        assert srv.proc.wait(timeout=60) == 0
        alive = still_running(children)
        assert not alive, f"processes left running after the kill: {alive}"
        assert "Stopping" not in srv.log_path.read_text(errors="replace")  # no clean shutdown: killed
    finally:
        srv.stop()


def test_launcher_restarts_a_child_that_asks(tmp_path, monkeypatch):
    """Where app.py cannot exec itself, launch.py runs it as a child and starts it again on RESTART_EXIT_CODE."""
    import launch
    from backend.core.cmd_args import RESTART_EXIT_CODE

    runs = tmp_path / "runs"
    runs.write_text("0")
    script = (f"import pathlib, sys; p = pathlib.Path({str(runs)!r}); n = int(p.read_text()) + 1; "
              f"p.write_text(str(n)); sys.exit({RESTART_EXIT_CODE} if n < 3 else 7)")
    monkeypatch.setattr(launch, "EXEC_IN_PLACE", False)
    monkeypatch.setattr(launch.os, "chdir", lambda path: None)
    assert launch.hand_over([sys.executable, "-c", script], RESTART_EXIT_CODE) == 7
    assert runs.read_text() == "3"
    runs.write_text("0")  # without a restart code (the test runner), the first exit code is the answer
    assert launch.hand_over([sys.executable, "-c", script]) == RESTART_EXIT_CODE and runs.read_text() == "1"
