"""A1111's task ids: a request's force_task_id names its job in GET /sdapi/v1/progress (`current_task`) and in
POST /internal/progress (`id_task`: active, queued, completed, progress, live preview)."""
from __future__ import annotations

import threading
import time

import httpx

SD1 = "tiny-sd1.safetensors"


def slow(task: str, steps: int = 150) -> dict:
    return {"prompt": "a cat", "steps": steps, "n_iter": 4, "width": 64, "height": 64, "seed": 1,
            "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": SD1}, "force_task_id": task}


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_force_task_id_names_the_task_in_both_progress_routes(api, server):
    def task(id_task: str, **kw) -> dict:
        r = httpx.post(server.url + "/internal/progress", json={"id_task": id_task, **kw}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    answers = {}

    def post(name: str, body: dict) -> None:
        answers[name] = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=600)

    first = threading.Thread(target=post, args=("first", slow("task(abc)")))
    first.start()
    second = None
    try:
        wait_for(lambda: api.get("/progress").json()["current_task"] == "task(abc)", "task(abc) never ran")
        running = wait_for(lambda: (lambda t: t if t["progress"] else None)(task("task(abc)")), "no progress")
        assert running["active"] and not running["queued"] and not running["completed"]
        assert 0 < running["progress"] <= 1 and running["textinfo"].startswith("Step ")
        second = threading.Thread(target=post, args=("second", slow("task(def)", steps=1)))
        second.start()
        waiting = wait_for(lambda: (lambda t: t if t["queued"] else None)(task("task(def)")), "task(def) not queued")
        assert not waiting["active"] and not waiting["completed"] and waiting["textinfo"] == "In queue: 1/1"
        unknown = task("task(nobody)")
        assert not (unknown["active"] or unknown["queued"] or unknown["completed"])
    finally:
        api.post("/interrupt")
        first.join(300)
        if second is not None:
            second.join(300)
    assert answers["first"].status_code == 200 and answers["second"].status_code == 200
    done = task("task(abc)")
    assert done["completed"] and not done["active"] and not done["queued"]
    assert task("task(def)")["completed"]
    assert api.get("/progress").json()["current_task"] is None
