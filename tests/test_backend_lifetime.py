"""The backend process never outlives the app process that started it, however the app ends."""
from __future__ import annotations

import queue
import re
import time

import psutil
import pytest

from backend.engine.worker import next_message
from conftest import Server


def test_next_message_stops_when_the_app_is_gone():
    jobs = queue.Queue()
    jobs.put({"job_id": 1})
    assert next_message(jobs, lambda: True, poll_seconds=0.01) == {"job_id": 1}
    alive = iter([True, True, False])
    assert next_message(jobs, lambda: next(alive), poll_seconds=0.01) is None


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_backend_exits_when_the_app_process_dies(tmp_path, how):
    srv = Server(tmp_path / "data")
    try:
        srv.wait()  # the API answers before the backend process is ready: wait for its line in the log
        deadline = time.time() + 120
        while not (found := re.search(r"backend ready \(pid (\d+)\)", srv.log_path.read_text(errors="replace"))):
            assert time.time() < deadline and srv.proc.poll() is None, "no backend pid in the log"
            time.sleep(0.2)
        backend = psutil.Process(int(found.group(1)))
        getattr(srv.proc, how)()  # SIGKILL: no clean-up code of the app runs at all
        srv.proc.wait(timeout=30)
        backend.wait(timeout=30)  # raises psutil.TimeoutExpired if the backend were left behind
        assert not backend.is_running()
    finally:
        srv.stop()
