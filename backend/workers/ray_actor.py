"""Backend workers as Ray actors (`--ray-address auto|HOST:PORT`), placed on the cluster by Ray.

Each actor holds the same `WorkerState` as a backend process and runs jobs with the same handlers
(`backend.engine.worker.answer_job`). It is a threaded actor (`max_concurrency` 4), so that `interrupt` and `skip`
reach it while a job runs. A job is a streaming-generator call (`run`): its progress events (with previews) stream
back as they come, and its last object is the `result`/`error` event. An actor that dies (its process killed, out
of memory, its node gone) raises `RayActorError` in the app's iteration: the transport reports it `dead`, and the
pool runs the job again once and starts a new actor. An idle actor's death is seen at once too: each ready actor
holds one call that only ends with the actor (`watch`).

Model files: the payload's paths are used as they are when the node sees them (a `--ckpt-dir` on storage every
node mounts). When a node lacks a checkpoint, VAE or "VAE / Text Encoder" part, the app reads the file once and
ships it through the object store (`ray.put`); the actor writes it into its node's temporary folder and runs the job
with that copy (reported under the original path, so that cache-aware routing still matches). Other files a job
names (LoRA, embeddings, ControlNet models, upscalers) must be on storage the node sees.

The actors import Easel from the app's repository folder (`PYTHONPATH` in the job's runtime environment): every
node needs Easel at that same path with the same Python packages (the same container image), and `--data-dir` on
shared storage. ray is imported only here, only with `--ray-address`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from backend.workers.base import EventSink, WorkerHandle

log = logging.getLogger("easel.ray")

ROOT = Path(__file__).resolve().parents[2]  # the repository: on every node at the same path
ACTOR_CONCURRENCY = 5  # a job, interrupt/skip, the file transfers and the watch call at the same time


# -- the payload's model files (used on both sides; torch-free) --------------------------------------------------
def model_files(payload: Any) -> list[str]:
    """The paths of the model files a job's payload names: checkpoint, VAE, the automatic choice's fallbacks, the
    "VAE / Text Encoder" parts."""
    if not isinstance(payload, dict):
        return []
    found: list[Any] = [payload.get("checkpoint"), payload.get("vae"), *(payload.get("parts") or [])]
    for pair in payload.get("checkpoint_fallbacks") or []:
        found.extend(pair)
    paths = []
    for item in found:
        path = getattr(item, "path", None)
        if path is not None and str(path) not in paths:
            paths.append(str(path))
    return paths


def localize(payload: Any, copies: dict[str, str]) -> Any:
    """`payload` with the model files in `copies` ({original path: local copy}) replaced by their copies."""
    if not isinstance(payload, dict) or not copies:
        return payload

    def swap(item):
        path = getattr(item, "path", None)
        if path is not None and str(path) in copies:
            return dataclasses.replace(item, path=Path(copies[str(path)]))
        return item

    changed = dict(payload)
    for key in ("checkpoint", "vae"):
        if changed.get(key) is not None:
            changed[key] = swap(changed[key])
    if changed.get("parts"):
        changed["parts"] = [swap(p) for p in changed["parts"]]
    if changed.get("checkpoint_fallbacks"):
        changed["checkpoint_fallbacks"] = [tuple(swap(p) for p in pair) for pair in changed["checkpoint_fallbacks"]]
    return changed


# -- the actor (in a Ray worker process, on any node) --------------------------------------------------------------
class _Flag:
    """An interrupt/skip flag inside the actor (the shape of a multiprocessing Value)."""

    def __init__(self):
        self.value = 0


class EaselActor:
    def __init__(self, args_dict: dict):
        logging.basicConfig(level=str(args_dict.get("loglevel", "INFO")).upper(),
                            format="%(asctime)s ray-worker %(levelname)s %(name)s: %(message)s")
        from backend.engine.worker import SharedFlags, build_state
        self.state = build_state(args_dict)
        self.flags = SharedFlags(_Flag(), _Flag())
        self.copies: dict[str, str] = {}  # original path -> the copy shipped to this node
        self.copy_dir = Path(tempfile.gettempdir()) / "easel-shipped-models"

    def hello(self) -> dict:
        import ray
        return {"type": "ready", "pid": os.getpid(), "device": self.state.policy.describe(),
                "node": ray.util.get_node_ip_address(), "checkpoints": self._checkpoints()}

    def missing(self, paths: list[str]) -> list[str]:
        """Which of `paths` this node has neither on its storage nor as a shipped copy."""
        return [p for p in paths if p not in self.copies and not Path(p).is_file()]

    def receive(self, path: str, data: bytes) -> str:
        """Keep a shipped model file (its bytes from the object store) as this node's copy of `path`."""
        folder = self.copy_dir / hashlib.sha1(path.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(path).name
        partial = target.with_suffix(target.suffix + ".part")
        partial.write_bytes(data)
        partial.replace(target)
        self.copies[path] = str(target)
        return str(target)

    def watch(self) -> None:
        """Never returns: the app's call fails when this actor dies, busy or idle."""
        threading.Event().wait()

    def interrupt(self) -> None:
        self.flags.interrupt_flag.value = 1

    def skip(self) -> None:
        self.flags.skip_flag.value = 1

    def _checkpoints(self) -> list[str]:
        from backend.engine.worker import loaded_checkpoints
        original = {copy: path for path, copy in self.copies.items()}
        return [original.get(p, p) for p in loaded_checkpoints(self.state)]

    def run(self, message: dict):
        """One job: yields its progress events as they come, then its result or error event."""
        import queue

        from backend.engine.worker import WorkerJobControl, answer_job

        self.flags.interrupt_flag.value = self.flags.skip_flag.value = 0
        events: queue.Queue = queue.Queue()
        job = {**message, "payload": localize(message["payload"], self.copies)}
        control = WorkerJobControl(message["job_id"], events, self.flags)
        end = object()

        def work() -> None:
            try:
                answer = answer_job(job, self.state, control)
                answer["checkpoints"] = self._checkpoints()
                events.put(answer)
            finally:
                events.put(end)

        threading.Thread(target=work, name=f"easel-job-{message['job_id']}", daemon=True).start()
        while (event := events.get()) is not end:
            yield event


# -- the app's side -------------------------------------------------------------------------------------------------
class RayCluster:
    """The connection to the cluster and how the actors are sized: one GPU each when the cluster has GPUs, else the
    cluster's CPUs split between the workers."""

    def __init__(self, ray, use_gpu: bool, cpus_per_worker: int):
        self.ray = ray
        self.use_gpu = use_gpu
        self.cpus_per_worker = cpus_per_worker
        self.actor_class = ray.remote(EaselActor)

    @classmethod
    def connect(cls, address: str, workers: int = 1) -> "RayCluster":
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("--ray-address needs the ray package: pip install -r requirements.txt") from exc
        if not ray.is_initialized():
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            ray.init(address=address, namespace="easel", runtime_env={"env_vars": {"PYTHONPATH": path}})
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        log.info("connected to the Ray cluster at %s: %d CPUs, %d GPUs", address, cpus, gpus)
        return cls(ray, gpus > 0, max(1, cpus // max(1, workers)))

    def worker(self, name: str, index: int, sink: EventSink, args_dict: dict) -> "RayWorker":
        return RayWorker(name, index, sink, args_dict, self)


class RayWorker(WorkerHandle):
    kind = "ray"

    def __init__(self, name: str, index: int, sink: EventSink, args_dict: dict, cluster: RayCluster):
        super().__init__(name, index, sink)
        # the actor's device is the one Ray gives it (CUDA_VISIBLE_DEVICES): no --device-id of the app's machine
        self.args_dict = {**args_dict, "device_id": None, "worker_index": 0, "worker_count": 1}
        self.cluster = cluster
        self.actor = None
        self._death_lock = threading.Lock()
        self._reported_dead = None  # the actor whose death was reported (once, by whichever call saw it first)

    def start(self) -> None:
        ray = self.cluster.ray
        if self.cluster.use_gpu:
            resources = {"num_gpus": 1, "num_cpus": 1}
        else:
            resources = {"num_cpus": self.cluster.cpus_per_worker}
        self.actor = actor = self.cluster.actor_class.options(max_concurrency=ACTOR_CONCURRENCY, max_restarts=0,
                                                              **resources).remote(self.args_dict)

        def wait_ready_then_watch() -> None:
            try:
                hello = ray.get(actor.hello.remote())
            except Exception as exc:  # noqa: BLE001  RayActorError: it died while starting
                log.error("%s did not start: %s", self.name, exc)
                self._died(actor)
                return
            watch = actor.watch.remote()  # asked before the pool hears of it, so a death after `ready` ends it
            self.sink(self, hello)
            try:
                ray.get(watch)
            except Exception as exc:  # noqa: BLE001  RayActorError: it died (or was killed by us: not reported)
                if self.actor is actor:
                    log.error("%s died: %s", self.name, exc)
                self._died(actor)

        threading.Thread(target=wait_ready_then_watch, name=f"easel-{self.name}-watch", daemon=True).start()

    def _died(self, actor) -> None:
        """Report `actor`'s death to the pool once, if it is still this worker's actor (not one it stopped)."""
        with self._death_lock:
            if self.actor is not actor or self._reported_dead is actor:
                return
            self._reported_dead = actor
        self.sink(self, {"type": "dead", "exitcode": None})

    def send(self, message: dict) -> None:
        threading.Thread(target=self._run, args=(self.actor, message), name=f"easel-{self.name}-job",
                         daemon=True).start()

    def _run(self, actor, message: dict) -> None:
        ray = self.cluster.ray
        from ray.exceptions import RayActorError, WorkerCrashedError
        try:
            self._ship_missing_files(actor, message["payload"])
            for ref in actor.run.options(num_returns="streaming").remote(message):
                self.sink(self, ray.get(ref))
        except (RayActorError, WorkerCrashedError) as exc:
            log.error("%s died during %s: %s", self.name, message["job_id"], exc)
            self._died(actor)
        except Exception as exc:  # noqa: BLE001  a failure of the call itself (not the job's, which is an event)
            log.exception("%s could not run %s", self.name, message["job_id"])
            self.sink(self, {"type": "error", "job_id": message["job_id"], "status": 500,
                             "message": f"The Ray worker could not run the job: {type(exc).__name__}: {exc}"})

    def _ship_missing_files(self, actor, payload: Any) -> None:
        ray = self.cluster.ray
        wanted = model_files(payload)
        if not wanted:
            return
        for path in ray.get(actor.missing.remote(wanted)):
            if not Path(path).is_file():
                continue  # the app does not have it either: the job reports the missing file
            log.info("shipping %s to %s", path, self.name)
            ray.get(actor.receive.remote(path, ray.put(Path(path).read_bytes())))

    def interrupt(self) -> None:
        self.interrupted = True
        if self.actor is not None:
            self.actor.interrupt.remote()

    def skip(self) -> None:
        self.skipped = True
        if self.actor is not None:
            self.actor.skip.remote()

    def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        actor, self.actor = self.actor, None
        if actor is not None:
            try:
                self.cluster.ray.kill(actor)
            except Exception:  # noqa: BLE001  already gone
                pass
