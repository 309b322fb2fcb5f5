"""A full queue never blocks the server: jobs waiting in the queue hold no web server thread, so progress,
interrupt and the UI page answer at once; past the `queue_max_jobs` setting, requests get 503 with Retry-After."""
from __future__ import annotations

import queue
import threading
import time

import httpx

from conftest import Server

LIMIT = 100  # queue_max_jobs for the test
BULK = 110  # concurrent txt2img requests: one runs, LIMIT wait, the rest are refused
# "At once" without a clock (a timed test fails on a busy machine): a call answers while the queue is still full,
# the jobs ahead of it done by then: at most the one running when it was sent (each job runs for many seconds).
AT_MOST_DONE_MEANWHILE = 1


def slow_job(i: int) -> dict:
    """A job that runs long enough (many steps) for the queue to stay full while the test looks."""
    return {"prompt": f"queued job {i}", "steps": 150, "width": 256, "height": 256, "seed": i,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}


def test_full_queue_answers_at_once_and_refuses_past_its_bound(tmp_path, tiny_models):
    srv = Server(tmp_path / "data", models={"sd1": tiny_models["sd1"]})
    answers: queue.Queue = queue.Queue()
    completed: list[int] = []  # the jobs that ended with their picture

    def answered_at_once(call) -> httpx.Response:
        before = len(completed)
        response = call()
        assert len(completed) - before <= AT_MOST_DONE_MEANWHILE, "the call waited for the queued jobs"
        return response

    def submit(i: int) -> None:
        try:
            r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=slow_job(i), timeout=600)
            if r.status_code == 200:
                completed.append(i)
            answers.put((r.status_code, r.headers, r.text))
        except httpx.HTTPError as exc:  # the server is stopped at the end with requests still waiting
            answers.put((None, {}, str(exc)))

    threads = [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(BULK)]
    try:
        srv.wait()
        with httpx.Client(base_url=srv.url + "/sdapi/v1", timeout=60) as api:
            r = api.post("/options", json={"queue_max_jobs": LIMIT})
            assert r.status_code == 200, r.text
            assert api.get("/options").json()["queue_max_jobs"] == LIMIT

            for t in threads:
                t.start()
            # The queue fills up; the requests past its bound are refused at once.
            deadline = time.monotonic() + 240
            status, headers, text = None, {}, ""
            while status != 503:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "no request was refused although more were sent than the queue takes"
                try:
                    status, headers, text = answers.get(timeout=remaining)
                except queue.Empty:
                    continue
                assert status in (200, 503), f"unexpected answer {status}: {text[:500]}"
            assert int(headers["retry-after"]) >= 1
            body = httpx.Response(503, text=text).json()
            assert set(body) >= {"error", "detail", "body", "errors"}
            assert "queue is full" in body["detail"] and "queue_max_jobs" in body["detail"]

            # With the queue full, the server still answers at once.
            r = answered_at_once(lambda: api.get("/progress"))
            assert r.status_code == 200
            assert r.json()["current_task"], "no job is running although the queue is full"
            r = answered_at_once(lambda: httpx.get(srv.url + "/", timeout=60))
            assert r.status_code == 200
            r = answered_at_once(lambda: api.post("/interrupt"))
            assert r.status_code == 200
            r = answered_at_once(lambda: api.get("/progress", params={"skip_current_image": True}))
            assert r.status_code == 200
    finally:
        srv.stop()  # the jobs still queued are dropped with the server
        for t in threads:
            if t.is_alive():
                t.join(timeout=30)
