"""The app process (UI + API) on its own: start-up time and memory, without the backend's share.

Starts `app.py --api` of a checkout (this one by default, or the repository root given as argument, to compare
two versions) on an empty data dir, so no model is loaded. Measures the seconds until GET /sdapi/v1/samplers
answers 200, the CPU time the app process spent until then (user + system: less sensitive than the wall time
to other load on the machine), then the app process's resident memory (psutil, the app's pid only: the backend
process it spawns is its child and is counted apart), and whether torch's library is mapped into the app process. The started
app keeps its bytecode in --pycache (never writes into the checkout); a warm-up start fills it.

    venv/bin/python benchmarks/bench_app_process.py                 # --rounds 3 (median)
    venv/bin/python benchmarks/bench_app_process.py /path/to/other/checkout
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.engine.devices.cpu import cpu_model_name  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_mapped(pid: int) -> bool:
    """True when a torch shared library (libtorch*.so) is mapped into the process."""
    try:
        return any("libtorch" in (m.path or "") for m in psutil.Process(pid).memory_maps(grouped=True))
    except (psutil.Error, OSError):
        return False


def one_round(root: Path, timeout: float, pycache: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="easel-bench-app-") as data_dir:
        port = free_port()
        cmd = [sys.executable, str(root / "app.py"), "--api", "--data-dir", data_dir, "--port", str(port),
               "--no-download-sd-model"]
        log = open(Path(data_dir) / "server.log", "wb")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPYCACHEPREFIX=pycache))
        try:
            deadline = start + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("the app exited:\n" + (Path(data_dir) / "server.log").read_text(errors="replace")[-3000:])
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no answer from /sdapi/v1/samplers within {timeout:.0f} s")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            ready_s = time.perf_counter() - start
            app = psutil.Process(proc.pid)
            children = app.children(recursive=True)
            cpu = app.cpu_times()
            return {
                "ready_s": ready_s,
                "app_cpu_s": cpu.user + cpu.system,
                "app_rss_mib": app.memory_info().rss / 2**20,
                "backend_rss_mib": sum(c.memory_info().rss for c in children) / 2**20,
                "torch_in_app": torch_mapped(proc.pid),
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default=str(ROOT), help="the checkout whose app.py to start (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="starts to run; the median is printed")
    parser.add_argument("--warmup", type=int, default=1, help="starts run first and not counted (bytecode cache)")
    parser.add_argument("--pycache", default=str(Path(tempfile.gettempdir()) / "easel-bench-pycache"),
                        help="where the started app keeps its bytecode (never inside the checkout)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the API to answer")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    for _ in range(max(0, args.warmup)):
        one_round(root, args.timeout, args.pycache)
    rounds = [one_round(root, args.timeout, args.pycache) for _ in range(max(1, args.rounds))]
    med = {k: statistics.median(r[k] for r in rounds) for k in ("ready_s", "app_cpu_s", "app_rss_mib", "backend_rss_mib")}
    print(f"CPU: {cpu_model_name()} ({os.cpu_count()} logical cores)")
    print(f"checkout: {root}")
    print(f"rounds: {len(rounds)} (median), after {args.warmup} warm-up start(s)")
    each = ", ".join(f"{r['ready_s']:.1f}" for r in rounds)
    print(f"start-up until /sdapi/v1/samplers answers: {med['ready_s']:.1f} s (rounds: {each})")
    print(f"app process CPU time until then: {med['app_cpu_s']:.1f} s (user + system, the backend apart; "
          f"steadier than the wall time when the machine is shared)")
    print(f"app process RSS: {med['app_rss_mib']:.0f} MiB (backend process, apart: {med['backend_rss_mib']:.0f} MiB)")
    print(f"torch library mapped in the app process: {'yes' if any(r['torch_in_app'] for r in rounds) else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
