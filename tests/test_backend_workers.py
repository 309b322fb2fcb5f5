"""Several backend workers behind the one queue (--backend-workers 2): jobs spread over both, cache-aware routing,
a worker killed during a job (its job run again on the other, same picture), GET /sdapi/v1/workers."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Server

A, B = "tiny-sd1.safetensors", "tiny-sd1_ckpt.ckpt"  # two checkpoint files (routing tells them apart by path)


def body(checkpoint: str = A, **kw) -> dict:
    req = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
           "cfg_scale": 7, "seed": 1234, "override_settings": {"sd_model_checkpoint": checkpoint}}
    req.update(kw)
    return req


def pixels(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


def workers(api) -> dict[str, dict]:
    r = api.get("/workers")
    assert r.status_code == 200, r.text
    return {w["name"]: w for w in r.json()}


def wait_idle(api, count: int = 2, timeout: float = 240) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = workers(api)
        if len(now) == count and all(w["state"] == "idle" for w in now.values()):
            return now
        time.sleep(0.3)
    raise AssertionError(f"the workers are not all idle: {workers(api)}")


def holding(state: dict[str, dict], checkpoint: str) -> list[str]:
    return [name for name, w in state.items() if any(c.endswith(checkpoint) for c in w["checkpoints"])]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_models):
    models = {k: tiny_models[k] for k in ("sd1", "sd1_ckpt")}
    with Server(tmp_path_factory.mktemp("workers-data"), extra_args=["--backend-workers", "2"], models=models) as srv:
        with httpx.Client(base_url=srv.url + "/sdapi/v1", timeout=600) as api:
            wait_idle(api)
            # one checkpoint per worker: the routing is then visible in what each has loaded
            assert api.post("/options", json={"sd_checkpoints_limit": 1}).status_code == 200
            yield srv, api


def test_two_workers_report_and_share_the_jobs(pool):
    srv, api = pool
    state = wait_idle(api)
    assert sorted(state) == ["worker-1", "worker-2"]
    pids = {w["pid"] for w in state.values()}
    assert len(pids) == 2 and None not in pids and srv.proc.pid not in pids
    assert all(w["device"] and "cpu" in w["device"].lower() for w in state.values()), state
    before = {name: w["jobs_done"] for name, w in state.items()}

    answers: list[httpx.Response] = []
    busy_seen: set[str] = set()
    threads = [threading.Thread(target=lambda i=i: answers.append(
        httpx.post(srv.url + "/sdapi/v1/txt2img", json=body(seed=100 + i, steps=8), timeout=600))) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        busy_seen |= {name for name, w in workers(api).items() if w["state"] == "busy"}
        time.sleep(0.05)
    assert [r.status_code for r in answers] == [200] * 4, [r.text[:300] for r in answers]
    after = wait_idle(api)
    done = {name: after[name]["jobs_done"] - before[name] for name in after}
    assert sum(done.values()) == 4 and all(n >= 1 for n in done.values()), done  # both ran some
    assert busy_seen == {"worker-1", "worker-2"}, busy_seen


def test_cache_aware_routing(pool):
    srv, api = pool
    assert api.post("/txt2img", json=body(A)).status_code == 200
    assert api.post("/txt2img", json=body(B)).status_code == 200
    state = wait_idle(api)
    with_a, with_b = holding(state, A), holding(state, B)
    assert len(with_a) == 1 and len(with_b) == 1 and with_a != with_b, state
    # jobs for B go to the worker that has B (least-recently-used routing would alternate between them)
    for i in range(3):
        before = wait_idle(api)
        assert api.post("/txt2img", json=body(B, seed=i)).status_code == 200
        after = wait_idle(api)
        ran = [n for n in after if after[n]["jobs_done"] > before[n]["jobs_done"]]
        assert ran == with_b, (ran, with_b)
        before = after
        assert api.post("/txt2img", json=body(A, seed=i)).status_code == 200
        after = wait_idle(api)
        ran = [n for n in after if after[n]["jobs_done"] > before[n]["jobs_done"]]
        assert ran == with_a, (ran, with_a)
    assert holding(after, A) == with_a and holding(after, B) == with_b  # nobody had to switch models


def test_killed_worker_job_runs_again_on_the_other(pool):
    srv, api = pool
    slow = body(A, steps=150, width=128, height=128, seed=777)
    reference = api.post("/txt2img", json=slow)
    assert reference.status_code == 200, reference.text
    wait_idle(api)
    answers: dict[str, httpx.Response] = {}
    runner = threading.Thread(target=lambda: answers.setdefault(
        "slow", httpx.post(srv.url + "/sdapi/v1/txt2img", json=slow, timeout=600)))
    runner.start()
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:  # the worker that runs it, once it samples
        if api.get("/progress").json()["state"]["sampling_step"] >= 1:
            victim = next((w for w in workers(api).values() if w["state"] == "busy"), None)
        time.sleep(0.05)
    assert victim is not None, "the job never started sampling"
    behind = threading.Thread(target=lambda: answers.setdefault(
        "behind", httpx.post(srv.url + "/sdapi/v1/txt2img", json=body(B, seed=5), timeout=600)))
    behind.start()
    os.kill(victim["pid"], signal.SIGKILL)
    states = set()
    while runner.is_alive() or behind.is_alive():
        states.add(workers(api)[victim["name"]]["state"])
        time.sleep(0.05)
    assert answers["slow"].status_code == 200, answers["slow"].text
    assert json.loads(answers["slow"].json()["info"])["seed"] == 777
    assert np.array_equal(pixels(answers["slow"]), pixels(reference))  # the same picture as the normal run
    assert answers["behind"].status_code == 200, answers["behind"].text  # the job queued behind it went on
    assert states & {"dead", "starting"}, states
    after = wait_idle(api)  # the dead worker restarted: a new process, idle again
    again = after[victim["name"]]
    assert again["pid"] != victim["pid"] and again["restarts"] == victim["restarts"] + 1, (victim, again)
