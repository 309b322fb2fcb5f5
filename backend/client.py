"""The app process's handle on the backend process.

Jobs from the UI and the API go into one queue here and are sent to the backend
process one at a time. A reader thread receives its events (progress, results,
errors). If the backend process dies, the job in flight fails with a clear
error, a new backend process is started, and the queued jobs go on.

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
import multiprocessing as mp
import math
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from backend.core.errors import QueueFull, UserError

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


def _backend_main(*args) -> None:
    """The backend process's entry point as the app names it: the engine (and torch) is imported there, in the
    spawned process, never in the app process (which pickles only this function's name)."""
    from backend.engine.worker import worker_main
    worker_main(*args)


class BackendClient:
    def __init__(self, args_dict: dict, start_timeout: float = 600.0, queue_limit: Callable[[], int] | None = None):
        self.args_dict = args_dict
        self.start_timeout = start_timeout
        self.queue_limit = queue_limit  # how many jobs may wait (not counting the running one); None: no bound
        self._ctx = mp.get_context("spawn")
        self._lock = threading.RLock()
        self._pending: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._last: Job | None = None
        self._by_id: dict[str, Job] = {}  # queued, running and recently finished jobs, oldest first
        self._durations: collections.deque[float] = collections.deque(maxlen=8)  # of recent jobs, for Retry-After
        self._ids = itertools.count(1)
        self._stopping = False
        self.process = None
        self.pid: int | None = None
        self.device: str | None = None
        self.restarts = 0
        self._interrupt = self._ctx.Value("b", 0)
        self._skip = self._ctx.Value("b", 0)
        self._ready = threading.Event()
        # Called with each finished job (done or failed) before its waiters wake (the service learns from results).
        self.finished_hooks: list[Callable[[Job], None]] = []

    # -- process lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._jobs = self._ctx.Queue()
        self._events = self._ctx.Queue()
        self._ready.clear()
        self.process = self._ctx.Process(target=_backend_main, name="easel-backend", daemon=True,
                                         args=(self.args_dict, self._jobs, self._events, self._interrupt, self._skip))
        self.process.start()
        if not getattr(self, "_reader", None) or not self._reader.is_alive():
            self._reader = threading.Thread(target=self._read_events, name="easel-backend-events", daemon=True)
            self._reader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout if timeout is not None else self.start_timeout)

    def stop(self) -> None:
        self._stopping = True
        try:
            self._jobs.put(None)
        except Exception:
            pass
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()

    def kill(self) -> None:
        """End the backend process at once (/sdapi/v1/server-kill): no job finishes, nothing restarts it."""
        self._stopping = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def _restart_after_death(self) -> None:
        code = self.process.exitcode
        with self._lock:
            job, self._current = self._current, None
        hint = " (killed: perhaps out of memory)" if code in (-9, 137) else ""
        message = f"The backend process stopped unexpectedly (exit code {code}{hint}) and has been restarted."
        log.error(message)
        if job is not None:
            self._finish(job, error=BackendError(message + " This job was lost; queued jobs go on."))
        self.restarts += 1
        self.start()

    def _read_events(self) -> None:
        while not self._stopping:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                if self.process is not None and not self.process.is_alive() and not self._stopping:
                    self._restart_after_death()
                continue
            except (EOFError, OSError):
                if self._stopping:
                    return
                time.sleep(0.2)
                continue
            kind = event["type"]
            if kind == "ready":
                self.pid, self.device = event["pid"], event["device"]
                self._ready.set()
                self._dispatch()
            elif kind == "progress":
                job = self._current
                if job and job.job_id == event["job_id"]:
                    job.step, job.total = event["step"], event["total"]
                    job.job_no, job.job_count = event["job_no"], event["job_count"]
                    if event.get("preview"):
                        job.preview_png = event["preview"]
                        job.preview_id += 1
                    for listener in list(job.listeners):
                        listener(job)
            elif kind in ("result", "error"):
                job = self._current
                if job is None or job.job_id != event["job_id"]:
                    continue
                with self._lock:
                    self._current = None
                if kind == "result":
                    self._finish(job, result=event["result"])
                else:
                    err_cls = UserError if event["status"] < 500 else BackendError
                    self._finish(job, error=err_cls(event["message"], event["status"]))
                self._dispatch()

    def _finish(self, job: Job, result: Any = None, error: Exception | None = None) -> None:
        job.result, job.error = result, error
        job.status = "failed" if error else "done"
        job.finished = time.time()
        if job.started:
            self._durations.append(job.finished - job.started)
        self._last = job
        for hook in list(self.finished_hooks) + list(job.on_end):
            try:
                hook(job)
            except Exception:  # noqa: BLE001  a hook's bug must not lose the job's result
                log.exception("finished-job hook failed")
        job.done.set()
        for listener in list(job.listeners):
            listener(job)

    def _dispatch(self) -> None:
        with self._lock:
            if self._current is not None or not self._pending or not self._ready.is_set():
                return
            job = self._pending.popleft()
            job.status, job.started = "running", time.time()
            self._current = job
            self._interrupt.value = 0
            self._skip.value = 0
        self._jobs.put({"job_id": job.job_id, "kind": job.kind, "payload": job.payload})

    # -- public ---------------------------------------------------------------------------------
    def submit(self, kind: str, payload: dict, listener: Callable[[Job], None] | None = None,
               on_end: Callable[[Job], None] | None = None, task_id: str | None = None) -> Job:
        """Queue a job; `QueueFull` (HTTP 503) when `queue_limit` jobs already wait. `on_end(job)` runs when it
        ends, before its waiters wake. `task_id`: the id progress reports for it (default: its job id)."""
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
            self._pending.append(job)
            self._remember(job)
        self._dispatch()
        return job

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
            waiting = [j for j in self._pending]
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

    def interrupt(self) -> None:
        with self._lock:
            if self._current is not None:
                self._interrupt.value = 1

    def skip(self) -> None:
        with self._lock:
            if self._current is not None:
                self._skip.value = 1

    @property
    def current(self) -> Job | None:
        return self._current

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def progress_state(self) -> dict:
        """A1111's /sdapi/v1/progress body."""
        job = self._current
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
            "state": {"skipped": bool(self._skip.value), "interrupted": bool(self._interrupt.value), "stopping_generation": False,
                      "job": f"Batch {job.job_no + 1} out of {job.job_count}", "job_count": job.job_count,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
                      "job_no": job.job_no, "sampling_step": job.step - job.job_no * per_job if per_job else job.step,
                      "sampling_steps": per_job},
        }
