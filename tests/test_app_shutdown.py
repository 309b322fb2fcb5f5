"""SIGTERM while a job runs: the job's request is answered (503, the server is shutting down) rather than cut off,
and the app and its backend process end."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from conftest import Server

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


@pytest.mark.parametrize("flags", [[], ["--nowebui"]], ids=["ui", "nowebui"])
def test_sigterm_answers_the_job_in_progress_and_ends_everything(tmp_path, tiny_models, flags):
    srv = Server(tmp_path / "data", extra_args=flags, models={"sd1": tiny_models["sd1"]})
    with srv:
        app = psutil.Process(srv.proc.pid)
        tree = [app, *app.children(recursive=True)]
        assert len(tree) >= 2, "expected the app and its backend process"
        answer: dict = {}

        def long_job() -> None:  # cannot end by itself before the signal: 1000 steps, a batch of 4
            try:
                answer["r"] = httpx.post(srv.url + "/sdapi/v1/txt2img", timeout=120, json={
                    "prompt": "a cat", "steps": 1000, "width": 256, "height": 256, "batch_size": 4})
            except httpx.HTTPError as exc:
                answer["r"] = exc

        runner = threading.Thread(target=long_job)
        runner.start()
        deadline = time.time() + 120
        while httpx.get(srv.url + "/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.time() < deadline, "the job never started sampling"
            time.sleep(0.1)
        srv.proc.send_signal(signal.SIGTERM)
        runner.join(60)
        response = answer.get("r")
        assert isinstance(response, httpx.Response), f"the request was cut off: {response!r}"
        assert response.status_code == 503 and "shutting down" in response.json()["detail"], response.text
        srv.proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
            time.sleep(0.2)
        assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
