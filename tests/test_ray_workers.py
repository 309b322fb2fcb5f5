"""--ray-address: the backend workers as Ray actors on a local Ray cluster the test starts (`ray start --head`, two
CPUs, stopped by pid at the end): a job through them, and a killed actor's job run again (same picture)."""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import Server, _free_port

ray = pytest.importorskip("ray")

RAY = Path(sys.executable).with_name("ray")


def body(**kw) -> dict:
    req = {"prompt": "a photo of a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
           "cfg_scale": 7, "seed": 99, "override_settings": {"sd_model_checkpoint": "tiny-sd1.safetensors"}}
    req.update(kw)
    return req


def pixels(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


def stop_by_pid(head: subprocess.Popen) -> None:
    """End the `ray start --block` process and every process it started (gcs, raylet, the actors' workers), each by
    its pid."""
    try:
        family = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    head.send_signal(signal.SIGTERM)  # --block: it stops the cluster's processes itself
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    gone, alive = psutil.wait_procs(family, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster on the loopback address, with its own token (RAY_AUTH_TOKEN, which the Easel server
    started below inherits); stopped by pid at the end."""
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path_factory.mktemp("ray") / "ray.log"
    log = open(log_path, "wb")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # until its GCS answers
            assert head.poll() is None, f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the Ray head did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        stop_by_pid(head)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory, tiny_models):
    srv = Server(tmp_path_factory.mktemp("ray-data"), models={"sd1": tiny_models["sd1"]},
                 extra_args=["--backend-workers", "2", "--ray-address", cluster])
    with srv:
        with httpx.Client(base_url=srv.url + "/sdapi/v1", timeout=600) as api:
            yield srv, api


def wait_idle(api, timeout: float = 300) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = {w["name"]: w for w in api.get("/workers").json()}
        if len(now) == 2 and all(w["state"] == "idle" for w in now.values()):
            return now
        time.sleep(0.3)
    raise AssertionError(f"the Ray workers are not all idle: {api.get('/workers').json()}")


def test_jobs_run_on_ray_actors_and_a_killed_actors_job_runs_again(ray_server):
    srv, api = ray_server
    state = wait_idle(api)
    assert sorted(state) == ["ray-worker-1", "ray-worker-2"]
    assert all(w["kind"] == "ray" and w["node"] for w in state.values()), state
    server_family = {p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)} | {srv.proc.pid}
    assert not {w["pid"] for w in state.values()} & server_family  # actors: Ray's processes, not the app's

    slow = body(steps=150, width=128, height=128, seed=4242)
    reference = api.post("/txt2img", json=slow)  # one job through Ray, progress streamed back meanwhile
    assert reference.status_code == 200, reference.text
    assert json.loads(reference.json()["info"])["seed"] == 4242
    after = wait_idle(api)
    assert sum(w["jobs_done"] for w in after.values()) == 1
    assert any(c.endswith("tiny-sd1.safetensors") for w in after.values() for c in w["checkpoints"]), after

    answer: dict[str, httpx.Response] = {}
    runner = threading.Thread(target=lambda: answer.setdefault(
        "r", httpx.post(srv.url + "/sdapi/v1/txt2img", json=slow, timeout=600)))
    runner.start()
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline:
        if api.get("/progress").json()["state"]["sampling_step"] >= 1:  # progress streams back from the actor
            victim = next((w for w in api.get("/workers").json() if w["state"] == "busy"), None)
        time.sleep(0.05)
    assert victim is not None, "the job never started sampling"
    os.kill(victim["pid"], signal.SIGKILL)
    runner.join(600)
    assert answer["r"].status_code == 200, answer["r"].text
    assert np.array_equal(pixels(answer["r"]), pixels(reference))  # run again on the other actor: same picture
    again = wait_idle(api)[victim["name"]]  # a new actor in its place
    assert again["pid"] != victim["pid"] and again["restarts"] == victim["restarts"] + 1, (victim, again)


def test_an_idle_actor_that_dies_is_replaced_before_any_job_needs_it(ray_server):
    srv, api = ray_server
    before = wait_idle(api)
    victim = before["ray-worker-1"]
    os.kill(victim["pid"], signal.SIGKILL)  # no job running or sent
    deadline = time.time() + 180
    while time.time() < deadline:
        now = {w["name"]: w for w in api.get("/workers").json()}
        if now["ray-worker-1"]["restarts"] == victim["restarts"] + 1 and now["ray-worker-1"]["state"] == "idle":
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"the dead idle actor was not replaced: {api.get('/workers').json()}")
    assert now["ray-worker-1"]["pid"] != victim["pid"]
    assert now["ray-worker-2"] == before["ray-worker-2"]  # the other one untouched
    assert sum(w["jobs_done"] for w in now.values()) == sum(w["jobs_done"] for w in before.values())
