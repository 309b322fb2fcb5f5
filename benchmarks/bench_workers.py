"""Throughput with 1 and 2 backend workers (images per minute), and the Ray path's overhead for one job.

Starts `app.py --api` on a fresh data dir with one checkpoint: the tiny SD 1.x of the tests (always), or, with
--full, the full-size SD 1.5 architecture with random weights (`benchmarks/_models.py`, about 2 GB, built once
into --models and reused; each image then takes minutes on a CPU). For each worker count it first runs one job per
worker at once (model loading, not counted), then sends --jobs txt2img requests at once and times them from the
first request to the last answer: images per minute = jobs / seconds * 60.

The Ray overhead (--ray): a one-node Ray cluster is started here (`ray start --head --block` on a free port, stopped
by pid at the end); with --backend-workers 1, the same one-job request is timed --rounds times through a local
worker and through a Ray actor (after a warm-up each); the difference of the medians is the Ray path's cost
per job (actor call, streamed progress events, result through the object store).

    venv/bin/python benchmarks/bench_workers.py                  # tiny model, 1 and 2 workers
    venv/bin/python benchmarks/bench_workers.py --ray            # ... and the Ray overhead for one job
    venv/bin/python benchmarks/bench_workers.py --full --jobs 4  # full-size SD 1.5 architecture (minutes)

On the CPU the workers split the physical cores (each worker's torch threads = cores // workers), so two workers
gain where one job does not use every core well (small images, the steps between sampler calls).
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_app_process import free_port  # noqa: E402  (benchmarks/ is on the path as the script's folder)
from backend.engine.devices.cpu import cpu_model_name  # noqa: E402


def checkpoint(full: bool, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if full:
        from benchmarks._models import random_checkpoint
        return random_checkpoint("sd1", folder)
    from model_factory import write_tiny_checkpoint
    path = folder / "bench-tiny-sd1.safetensors"
    if not path.exists():
        write_tiny_checkpoint(path, "sd1", fmt="safetensors", seed=1)
    return path


class App:
    """app.py --api on its own data dir, with the checkpoint linked into it."""

    def __init__(self, ckpt: Path, extra: list[str]):
        self.data = Path(tempfile.mkdtemp(prefix="easel-bench-workers-"))
        folder = self.data / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        (folder / ckpt.name).symlink_to(ckpt.resolve())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/sdapi/v1"
        self.log = open(self.data / "server.log", "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--api", "--nowebui", "--data-dir",
                                      str(self.data), "--port", str(self.port), "--no-download-sd-model", *extra],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_workers(self, count: int, timeout: float = 900) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.data / "server.log").read_text(errors="replace")[-3000:])
            try:
                workers = httpx.get(self.url + "/workers", timeout=5).json()
                if len(workers) == count and all(w["state"] == "idle" for w in workers):
                    return workers
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("the workers did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def request(ckpt: Path, args, seed: int) -> dict:
    return {"prompt": "a photo of a cat", "steps": args.steps, "width": args.size, "height": args.size,
            "sampler_name": "Euler", "seed": seed, "override_settings": {"sd_model_checkpoint": ckpt.name}}


def run_at_once(app: App, bodies: list[dict]) -> float:
    """Send every request at once; the seconds until the last answer (each must be 200)."""
    codes: list[int] = []

    def one(body):
        codes.append(httpx.post(app.url + "/txt2img", json=body, timeout=None).status_code)

    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - start
    if codes != [200] * len(bodies):
        raise RuntimeError(f"answers {codes}: see {app.data / 'server.log'}")
    return took


def throughput(ckpt: Path, workers: int, args) -> float:
    app = App(ckpt, ["--backend-workers", str(workers)])
    try:
        app.wait_workers(workers)
        run_at_once(app, [request(ckpt, args, seed=i) for i in range(workers)])  # each worker loads the model
        took = run_at_once(app, [request(ckpt, args, seed=100 + i) for i in range(args.jobs)])
        return args.jobs / took * 60
    finally:
        app.stop()


def one_job_seconds(ckpt: Path, extra: list[str], args) -> float:
    app = App(ckpt, ["--backend-workers", "1", *extra])
    try:
        app.wait_workers(1)
        run_at_once(app, [request(ckpt, args, seed=0)])
        return statistics.median(run_at_once(app, [request(ckpt, args, seed=i)]) for i in range(args.rounds))
    finally:
        app.stop()


def ray_head() -> tuple[subprocess.Popen, str]:
    port = free_port()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return head, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("ray start did not come up")


def stop_ray(head: subprocess.Popen) -> None:
    family = psutil.Process(head.pid).children(recursive=True)
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
    for proc in psutil.wait_procs(family, timeout=10)[1]:
        proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full-size SD 1.5 architecture (random weights)")
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "easel-bench-models"),
                        help="where the checkpoint is written once and reused")
    parser.add_argument("--jobs", type=int, default=None, help="requests sent at once (default: 16 tiny, 4 full)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20 tiny, 10 full)")
    parser.add_argument("--size", type=int, default=None, help="width and height (default: 128 tiny, 512 full)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--ray", action="store_true", help="also time one job through a Ray actor vs a local worker")
    parser.add_argument("--rounds", type=int, default=5, help="one-job timings per path (the median is printed)")
    args = parser.parse_args()
    args.jobs = args.jobs or (4 if args.full else 16)
    args.steps = args.steps or (10 if args.full else 20)
    args.size = args.size or (512 if args.full else 128)
    ckpt = checkpoint(args.full, Path(args.models))
    print(f"CPU: {cpu_model_name()} ({psutil.cpu_count(logical=False)} physical cores, {psutil.cpu_count()} logical)")
    print(f"model: {'full-size SD 1.5 (random weights)' if args.full else 'tiny SD 1.x'}; {args.jobs} jobs of "
          f"{args.size}x{args.size}, {args.steps} steps, Euler")
    for workers in (int(n) for n in args.workers.split(",")):
        rate = throughput(ckpt, workers, args)
        print(f"{workers} worker(s): {rate:.1f} images/minute")
    if args.ray:
        local = one_job_seconds(ckpt, [], args)
        head, address = ray_head()
        try:
            remote = one_job_seconds(ckpt, ["--ray-address", address], args)
        finally:
            stop_ray(head)
        print(f"one job, median of {args.rounds}: local worker {local:.3f} s, Ray actor {remote:.3f} s, "
              f"Ray overhead {remote - local:+.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
