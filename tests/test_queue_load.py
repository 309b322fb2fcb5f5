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
ANSWER_WITHIN_S = 3.0  # a wide margin: an idle server answers these in milliseconds


def slow_job(i: int) -> dict:
    """A job that runs long enough (many steps) for the queue to stay full while the test looks."""
    return {"prompt": f"queued job {i}", "steps": 150, "width": 256, "height": 256, "seed": i,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}


def timed(call) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def test_full_queue_answers_at_once_and_refuses_past_its_bound(tmp_path, tiny_models):
    srv = Server(tmp_path / "data", models={"sd1": tiny_models["sd1"]})
    answers: queue.Queue = queue.Queue()

    def submit(i: int) -> None:
        try:
            r = httpx.post(srv.url + "/sdapi/v1/txt2img", json=slow_job(i), timeout=600)
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
            r, took = timed(lambda: api.get("/progress"))
            assert r.status_code == 200 and took < ANSWER_WITHIN_S, f"GET /progress took {took:.1f} s"
            assert r.json()["current_task"], "no job is running although the queue is full"
            r, took = timed(lambda: httpx.get(srv.url + "/", timeout=60))
            assert r.status_code == 200 and took < ANSWER_WITHIN_S, f"the UI page took {took:.1f} s"
            r, took = timed(lambda: api.post("/interrupt"))
            assert r.status_code == 200 and took < ANSWER_WITHIN_S, f"POST /interrupt took {took:.1f} s"
            r, took = timed(lambda: api.get("/progress", params={"skip_current_image": True}))
            assert r.status_code == 200 and took < ANSWER_WITHIN_S, f"GET /progress took {took:.1f} s"
    finally:
        srv.stop()  # the jobs still queued are dropped with the server
        for t in threads:
            if t.is_alive():
                t.join(timeout=30)
