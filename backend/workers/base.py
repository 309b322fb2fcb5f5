"""What the pool (`backend.client.BackendClient`) sees of a worker, whatever carries its jobs."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from backend.client import Job

# A worker's states, as GET /sdapi/v1/workers reports them.
STARTING, IDLE, BUSY, DEAD = "starting", "idle", "busy", "dead"

# (worker, event) -> None: the pool's one handler of every worker's events.
EventSink = Callable[["WorkerHandle", dict], None]


class WorkerHandle:
    """One worker: the pool's record of it (state, current job, loaded checkpoints) and the transport's methods.

    Transports implement `start` (start it; a `ready` event follows, or `dead`), `send` (one job message
    {job_id, kind, payload, entropy}; its `progress` events and then one `result` or `error` event follow, or `dead`),
    `interrupt`/`skip`/`clear_flags` (the running job's stop flags), `stop` (end it, waiting a little) and `kill`
    (end it at once). Every event reaches `sink(worker, event)`, from the transport's own threads; a `dead` event
    ({"type": "dead", "exitcode"}) says the worker is gone (killed, out of memory, crashed)."""

    kind = "local"

    def __init__(self, name: str, index: int, sink: EventSink):
        self.name = name
        self.index = index  # its place in the pool (worker_index: its device among the pool's)
        self.sink = sink
        self.pid: int | None = None
        self.device: str | None = None
        self.node: str | None = None
        self.state = STARTING
        self.jobs_done = 0
        self.restarts = 0
        self.checkpoints: list[str] = []  # paths of the checkpoints it has loaded, least recently used first
        self.current: Job | None = None
        self.last_used = 0.0  # when it last took a job (routing prefers the least recently used)
        self.interrupted = False
        self.skipped = False

    def describe(self) -> dict[str, Any]:
        """Its GET /sdapi/v1/workers entry."""
        info = {"name": self.name, "pid": self.pid, "device": self.device, "state": self.state,
                "jobs_done": self.jobs_done, "checkpoints": list(self.checkpoints), "kind": self.kind,
                "restarts": self.restarts, "job": self.current.job_id if self.current is not None else None}
        if self.node:
            info["node"] = self.node
        return info

    def took(self, job: Job) -> None:
        self.current, self.state, self.last_used = job, BUSY, time.monotonic()
        self.clear_flags()

    # -- the transport's part -------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def send(self, message: dict) -> None:
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError

    def skip(self) -> None:
        raise NotImplementedError

    def clear_flags(self) -> None:
        self.interrupted = self.skipped = False

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError
