"""The app process's handle on the backend workers: one job queue in front of one or several workers.

Jobs from the UI and the API go into one queue here. Each worker (`backend.workers`: a spawned backend process, or
a Ray actor with `--ray-address`) owns one device and runs one job at a time; `--backend-workers N` starts N. A job
goes to an idle worker, preferring one that already has the job's checkpoint loaded (`choose_worker`), so that
switching models is rare. Jobs that change every worker's state (`unload`) go to each worker.

Each worker's events (progress, results, errors, its death) come to one handler (`_on_event`). When a worker dies
during a job (killed, out of memory, crashed), the job is put back at the head of the queue once, so another worker
runs it again with the same payload (a fixed seed gives the same image); a second death fails it with a clear
error. The worker is restarted (dead -> starting -> idle) and the queued jobs go on.

The queue is bounded (`queue_limit`, the `queue_max_jobs` setting): past it,
`submit` refuses with `QueueFull`. Jobs are kept by id while queued or running
and for a while after they end, so that a reloaded page can reattach to its job
(`find_job`). Asyncio code waits for a job with `Job.wait_async` / `Job.outcome`,
which hold no thread while the job waits.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from backend.core.errors import QueueFull, UserError
from backend.workers.base import DEAD, IDLE, STARTING, WorkerHandle

log = logging.getLogger("easel.client")

KEEP_FINISHED_JOBS = 16  # finished jobs kept for pages that reattach after a reload...
KEEP_FINISHED_S = 900.0  # ...for at most this long after they end


class BackendError(Exception):
    """A job failed for a reason that is not the user's input (reported as HTTP 500)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Job:
    job_id: str
    kind: str
    payload: dict
    status: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    # a secret the page that started the job keeps, to reattach to it after a reload (nobody else can)
    watch_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    task_id: str | None = None  # the id progress reports (A1111's force_task_id); job_id when None
    step: int = 0
    total: int = 0
    job_no: int = 0
    job_count: int = 1
    preview_png: bytes | None = None
    preview_id: int = 0
    result: Any = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)
    listeners: list[Callable[["Job"], None]] = field(default_factory=list)
    # run once when the job ends, before anyone waiting for it wakes (so they see what these did)
    on_end: list[Callable[["Job"], None]] = field(default_factory=list)
    worker: str | None = None  # the name of the worker that runs (or ran) it
    runs: int = 0  # how many times a worker took it (2: its first worker died under it)
    pinned: str | None = None  # the worker it must run on (a part of a job sent to every worker)
    # seeds Python's `random` in the worker for this job: a re-run resolves random seeds (-1) to the same ones
    entropy: int = field(default_factory=lambda: secrets.randbits(64))

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def eta(self) -> float:
        if not self.started or not self.step or not self.total:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.step * (self.total - self.step))

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait for the job to end from asyncio code, holding no thread meanwhile; False if `timeout` passed first."""
        if self.done.is_set():
            return True
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def wake(job: Job) -> None:  # called on the client's reader thread
            if job.done.is_set():
                try:
                    loop.call_soon_threadsafe(_resolve, ended)
                except RuntimeError:  # the event loop is closed: nobody waits any more
                    pass

        self.listeners.append(wake)
        try:
            if self.done.is_set():  # it ended while the listener was being added
                return True
            try:
                await asyncio.wait_for(ended, timeout)
            except TimeoutError:
                return False
            return True
        finally:
            try:
                self.listeners.remove(wake)
            except ValueError:
                pass

    async def outcome(self, timeout: float | None = None) -> Any:
        """The job's result once it ends (its error raised), awaited without holding a thread."""
        if not await self.wait_async(timeout):
            raise BackendError(f"{self.kind} did not finish within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.result


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# Job kinds that change every worker's state: sent to each worker (the job ends when all have answered).
BROADCAST_KINDS = frozenset({"unload"})
MAX_RUNS = 2  # a job whose worker dies under it runs once more; a second death fails it


def checkpoint_of(payload: Any) -> str | None:
    """The path of the checkpoint a job's payload asks for (`EaselService._model_payload`), None for jobs without one."""
    if not isinstance(payload, dict):
        return None
    ckpt = payload.get("checkpoint")
    path = getattr(ckpt, "path", None) if ckpt is not None else None
    return str(path) if path is not None else None


def choose_worker(job: Job, idle: list[WorkerHandle]) -> WorkerHandle | None:
    """Cache-aware routing among the idle workers: one that has the job's checkpoint loaded, else one with nothing
    loaded, else any; the least recently used among equals. A job pinned to a worker (a broadcast's part) waits for
    that one."""
    if job.pinned is not None:
        return next((w for w in idle if w.name == job.pinned), None)
    if not idle:
        return None
    wanted = checkpoint_of(job.payload)
    for group in ([w for w in idle if wanted is not None and wanted in w.checkpoints],
                  [w for w in idle if not w.checkpoints], idle):
        if group:
            return min(group, key=lambda w: (w.last_used, w.index))
    return None


class BackendClient:
    def __init__(self, args_dict: dict, start_timeout: float = 600.0, queue_limit: Callable[[], int] | None = None,
                 workers: int | None = None):
        self.args_dict = args_dict
        self.start_timeout = start_timeout
        self.queue_limit = queue_limit  # how many jobs may wait (not counting the running ones); None: no bound
        self.worker_count = max(1, int(workers if workers is not None else args_dict.get("backend_workers") or 1))
        self.ray_address = args_dict.get("ray_address") or None
        self._lock = threading.RLock()
        self._pending: collections.deque[Job] = collections.deque()
        self._last: Job | None = None
        self._by_id: dict[str, Job] = {}  # queued, running and recently finished jobs, oldest first
        self._durations: collections.deque[float] = collections.deque(maxlen=8)  # of recent jobs, for Retry-After
        self._ids = itertools.count(1)
        self._stopping = False
        self.workers: list[WorkerHandle] = []
        self._ready = threading.Event()
        # Called with each finished job (done or failed) before its waiters wake (the service learns from results).
        self.finished_hooks: list[Callable[[Job], None]] = []

    # -- workers' lifecycle --------------------------------------------------------------------
    def _worker_args(self, index: int) -> dict:
        return {**self.args_dict, "worker_index": index, "worker_count": self.worker_count}

    def _make_workers(self) -> list[WorkerHandle]:
        if self.ray_address:
            from backend.workers.ray_actor import RayCluster  # ray is imported only here
            cluster = RayCluster.connect(self.ray_address, self.worker_count)
            return [cluster.worker(f"ray-worker-{i + 1}", i, self._on_event, self._worker_args(i))
                    for i in range(self.worker_count)]
        from backend.workers.local import LocalWorker
        return [LocalWorker(f"worker-{i + 1}", i, self._on_event, self._worker_args(i)) for i in range(self.worker_count)]

    def start(self) -> None:
        self._stopping = False
        self._ready.clear()
        if not self.workers:
            self.workers = self._make_workers()
        for worker in self.workers:
            worker.state = STARTING
            worker.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Until one worker is ready (the others join as they come up)."""
        return self._ready.wait(timeout if timeout is not None else self.start_timeout)

    def stop(self) -> None:
        """End the workers. The jobs still queued or running fail at once with a 503 saying the server is shutting
        down (their requests answer instead of waiting for a worker that will not come back); a running job is
        interrupted first, so its worker ends cleanly."""
        with self._lock:
            self._stopping = True
            unfinished = list(self._pending)
            self._pending.clear()
            busy = [w for w in self.workers if w.current is not None]
            for worker in busy:
                unfinished.append(worker.current)
                worker.current = None
        for worker in busy:
            worker.interrupt()
        for job in unfinished:
            self._finish(job, error=BackendError("The server is shutting down: this job did not finish. Send it "
                                                 "again once the server is back.", 503))
        for worker in self.workers:
            worker.stop()

    def kill(self) -> None:
        """End the workers at once (/sdapi/v1/server-kill): no job finishes, nothing restarts them."""
        self._stopping = True
        for worker in self.workers:
            worker.kill()

    # compatibility: the first worker's process, pid and device (one worker: the backend process)
    @property
    def process(self):
        return getattr(self.workers[0], "process", None) if self.workers else None

    @property
    def pid(self) -> int | None:
        return self.workers[0].pid if self.workers else None

    @property
    def device(self) -> str | None:
        return self.workers[0].device if self.workers else None

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def workers_state(self) -> list[dict]:
        """GET /sdapi/v1/workers: each worker's name, pid, device, state, jobs done and loaded checkpoints."""
        with self._lock:
            return [w.describe() for w in self.workers]

    # -- events --------------------------------------------------------------------------------
    def _on_event(self, worker: WorkerHandle, event: dict) -> None:
        """Every worker's events, from its transport's thread."""
        kind = event["type"]
        if kind == "ready":
            with self._lock:
                worker.pid, worker.device = event["pid"], event["device"]
                worker.node = event.get("node")
                worker.checkpoints = list(event.get("checkpoints", []))
                worker.state = IDLE
            log.info("%s ready (pid %s): %s", worker.name, worker.pid, worker.device)
            self._ready.set()
            self._dispatch()
        elif kind == "progress":
            job = worker.current
            if job and job.job_id == event["job_id"]:
                job.step, job.total = event["step"], event["total"]
                job.job_no, job.job_count = event["job_no"], event["job_count"]
                if event.get("preview"):
                    job.preview_png = event["preview"]
                    job.preview_id += 1
                for listener in list(job.listeners):
                    listener(job)
        elif kind in ("result", "error"):
            with self._lock:
                job = worker.current
                if job is None or job.job_id != event["job_id"]:
                    return
                worker.current, worker.state = None, IDLE
                worker.jobs_done += 1
                if "checkpoints" in event:
                    worker.checkpoints = list(event["checkpoints"])
            if kind == "result":
                self._finish(job, result=event["result"])
            else:
                err_cls = UserError if event["status"] < 500 else BackendError
                self._finish(job, error=err_cls(event["message"], event["status"]))
            self._dispatch()
        elif kind == "dead":
            self._worker_died(worker, event.get("exitcode"))

    def _worker_died(self, worker: WorkerHandle, code) -> None:
        if self._stopping:
            return
        hint = ": killed, perhaps out of memory" if code in (-9, 137) else ""
        how = f" (exit code {code}{hint})" if code is not None else ""
        message = f"The backend process {worker.name} stopped unexpectedly{how} and has been restarted."
        log.error(message)
        with self._lock:
            job, worker.current = worker.current, None
            worker.state, worker.checkpoints = DEAD, []
            rerun = job is not None and job.runs < MAX_RUNS and job.pinned is None
            if rerun:  # back at the head of the queue: the next idle worker runs it again, same payload
                job.status, job.started = "queued", None
                job.step = job.total = job.job_no = 0
                self._pending.appendleft(job)
        if job is not None and rerun:
            log.warning("job %s was running on %s: it runs again on another worker", job.job_id, worker.name)
        elif job is not None:
            again = " again" if job.runs > 1 else ""
            self._finish(job, error=BackendError(message + f" This job was lost{again}; queued jobs go on."))
        worker.restarts += 1
        worker.state = STARTING
        try:
            worker.start()
        except Exception:  # noqa: BLE001  e.g. the Ray cluster is gone: the worker stays dead, the others go on
            log.exception("%s could not be restarted", worker.name)
            worker.state = DEAD
        self._dispatch()

    def _finish(self, job: Job, result: Any = None, error: Exception | None = None) -> None:
        job.result, job.error = result, error
        job.status = "failed" if error else "done"
        job.finished = time.time()
        if job.started:
            self._durations.append(job.finished - job.started)
        if job.pinned is None:
            self._last = job
        for hook in (list(self.finished_hooks) if job.pinned is None else []) + list(job.on_end):
            try:
                hook(job)
            except Exception:  # noqa: BLE001  a hook's bug must not lose the job's result
                log.exception("finished-job hook failed")
        job.done.set()
        for listener in list(job.listeners):
            listener(job)

    def _dispatch(self) -> None:
        """Give queued jobs to idle workers (`choose_worker`), oldest job first."""
        sends = []
        with self._lock:
            idle = [w for w in self.workers if w.state == IDLE and w.current is None]
            for job in list(self._pending):
                if not idle:
                    break
                worker = choose_worker(job, idle)
                if worker is None:
                    continue
                self._pending.remove(job)
                idle.remove(worker)
                job.status, job.started, job.worker = "running", time.time(), worker.name
                job.runs += 1
                worker.took(job)
                sends.append((worker, {"job_id": job.job_id, "kind": job.kind, "payload": job.payload,
                                       "entropy": job.entropy}))
        for worker, message in sends:
            try:
                worker.send(message)
            except Exception as exc:  # noqa: BLE001  the transport could not take it (a Ray actor gone)
                log.error("sending %s to %s failed: %s", message["job_id"], worker.name, exc)
                self._worker_died(worker, None)

    # -- public ---------------------------------------------------------------------------------
    def submit(self, kind: str, payload: dict, listener: Callable[[Job], None] | None = None,
               on_end: Callable[[Job], None] | None = None, task_id: str | None = None) -> Job:
        """Queue a job; `QueueFull` (HTTP 503) when `queue_limit` jobs already wait. `on_end(job)` runs when it
        ends, before its waiters wake. `task_id`: the id progress reports for it (default: its job id). A kind in
        `BROADCAST_KINDS` runs on every worker; its job ends with the first worker's answer once all have answered
        (the first error, if any)."""
        limit = self.queue_limit() if self.queue_limit else None
        job = Job(job_id=f"job-{next(self._ids)}", kind=kind, payload=payload, on_end=[on_end] if on_end else [],
                  task_id=task_id)
        if listener:
            job.listeners.append(listener)
        with self._lock:
            if limit is not None and len(self._pending) >= limit:
                retry = self._retry_after()
                raise QueueFull(f"The queue is full: {len(self._pending)} jobs are waiting, the most this server takes "
                                f"(setting queue_max_jobs: {limit}). Try again in about {retry} s.", retry_after=retry)
            self._remember(job)
            if kind in BROADCAST_KINDS and len(self.workers) > 1:
                self._broadcast(job)
            else:
                self._pending.append(job)
        self._dispatch()
        return job

    def _broadcast(self, job: Job) -> None:
        """`job` as one part per worker, each pinned to its worker; `job` ends when the last part ends."""
        parts = [Job(job_id=f"{job.job_id}-{w.name}", kind=job.kind, payload=job.payload, pinned=w.name)
                 for w in self.workers]
        left = [len(parts)]

        def part_ended(part: Job) -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
            error = next((p.error for p in parts if p.error is not None), None)
            self._finish(job, result=None if error else parts[0].result, error=error)

        job.status, job.started = "running", time.time()
        for part in parts:
            part.on_end.append(part_ended)
            self._pending.append(part)

    def _retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: about one job's time."""
        typical = sum(self._durations) / len(self._durations) if self._durations else 10.0
        return max(1, min(3600, math.ceil(typical)))

    def _remember(self, job: Job) -> None:
        """Keep `job` by id; forget finished jobs beyond the bounds, oldest first (never an unfinished one)."""
        self._by_id[job.job_id] = job
        now = time.time()
        finished = [j for j in self._by_id.values() if j.finished is not None]
        extra = len(finished) - KEEP_FINISHED_JOBS
        for old in finished:
            if extra > 0 or now - old.finished > KEEP_FINISHED_S:
                del self._by_id[old.job_id]
                extra -= 1

    def find_job(self, job_id: str, watch_key: str) -> Job | None:
        """A queued, running or recently finished job, if `watch_key` is the one it was given (else None)."""
        with self._lock:
            job = self._by_id.get(str(job_id))
        if job is None or not secrets.compare_digest(job.watch_key.encode(), str(watch_key).encode()):
            return None
        return job

    def task_progress(self, task_id: str, id_live_preview: int = -1, live_preview: bool = True) -> dict:
        """A1111's `POST /internal/progress` answer for the job whose task id (a request's force_task_id, else its job
        id) is `task_id`: whether it runs, waits or has finished; when it runs, its progress, ETA and the preview
        newer than `id_live_preview` (as a data: URL)."""
        with self._lock:
            jobs = [j for j in self._by_id.values() if (j.task_id or j.job_id) == task_id]
            job = jobs[-1] if jobs else None
            waiting = [j for j in self._pending if j.pinned is None]
        if job is None or job.status != "running":
            queued = job is not None and job.status == "queued"
            textinfo = f"In queue: {waiting.index(job) + 1}/{len(waiting)}" if queued and job in waiting else "Waiting..."
            return {"active": False, "queued": queued, "completed": job is not None and job.finished is not None,
                    "progress": None, "eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": textinfo}
        preview, preview_id = None, id_live_preview
        if live_preview and job.preview_png and job.preview_id != id_live_preview:
            preview = "data:image/png;base64," + base64.b64encode(job.preview_png).decode()
            preview_id = job.preview_id
        return {"active": True, "queued": False, "completed": False, "progress": job.progress,
                "eta": job.eta if job.step else None, "live_preview": preview, "id_live_preview": preview_id,
                "textinfo": f"Step {job.step}/{job.total}" if job.total else "Waiting..."}

    def run(self, kind: str, payload: dict, timeout: float | None = None) -> Any:
        job = self.submit(kind, payload)
        if not job.done.wait(timeout):
            raise BackendError(f"{kind} did not finish within {timeout} s")
        if job.error:
            raise job.error
        return job.result

    def _running(self) -> list[tuple[Job, WorkerHandle]]:
        """The running jobs with their workers, the oldest first."""
        with self._lock:
            running = [(w.current, w) for w in self.workers if w.current is not None]
        return sorted(running, key=lambda pair: pair[0].started or 0.0)

    def _workers_for(self, job_id: str | None) -> list[WorkerHandle]:
        return [w for job, w in self._running() if job_id is None or job.job_id == job_id]

    def interrupt(self, job_id: str | None = None) -> None:
        """Stop the job `job_id` on its worker (no id: every running job, as A1111's /sdapi/v1/interrupt)."""
        for worker in self._workers_for(job_id):
            worker.interrupt()

    def skip(self, job_id: str | None = None) -> None:
        """Skip the current batch of the job `job_id` (no id: of every running job)."""
        for worker in self._workers_for(job_id):
            worker.skip()

    @property
    def current(self) -> Job | None:
        """The oldest running job (None when no worker runs one)."""
        running = self._running()
        return running[0][0] if running else None

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def position(self, job: Job) -> int:
        """How many queued jobs are ahead of `job` (0 when it is first, or not queued)."""
        with self._lock:
            waiting = [j for j in self._pending if j.pinned is None]
            return waiting.index(job) if job in waiting else 0

    def progress_state(self) -> dict:
        """A1111's /sdapi/v1/progress body, of the oldest running job when several run."""
        running = self._running()
        job, worker = running[0] if running else (None, None)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None, "current_task": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        per_job = job.total // max(1, job.job_count) if job.total else 0
        return {
            "progress": job.progress,
            "eta_relative": job.eta,
            "current_image": base64.b64encode(job.preview_png).decode() if job.preview_png else None,
            "textinfo": f"Step {job.step}/{job.total}" if job.total else "Waiting...",
            "current_task": job.task_id or job.job_id,
            "state": {"skipped": worker.skipped, "interrupted": worker.interrupted, "stopping_generation": False,
                      "job": f"Batch {job.job_no + 1} out of {job.job_count}", "job_count": job.job_count,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
                      "job_no": job.job_no, "sampling_step": job.step - job.job_no * per_job if per_job else job.step,
                      "sampling_steps": per_job},
        }
