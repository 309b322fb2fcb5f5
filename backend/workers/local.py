"""A worker as a spawned backend process on this machine: two queues (jobs in, events out), two shared flags
(interrupt, skip) and a reader thread that hands its events to the pool."""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time

from backend.workers.base import EventSink, WorkerHandle


def _backend_main(*args) -> None:
    """The backend process's entry point as the app names it: the engine (and torch) is imported there, in the
    spawned process, never in the app process (which pickles only this function's name)."""
    from backend.engine.worker import worker_main
    worker_main(*args)


class LocalWorker(WorkerHandle):
    kind = "local"

    def __init__(self, name: str, index: int, sink: EventSink, args_dict: dict):
        super().__init__(name, index, sink)
        self.args_dict = args_dict
        self._ctx = mp.get_context("spawn")
        self._interrupt = self._ctx.Value("b", 0)
        self._skip = self._ctx.Value("b", 0)
        self.process = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._jobs = self._ctx.Queue()
        events = self._ctx.Queue()
        self.process = self._ctx.Process(target=_backend_main, name=f"easel-{self.name}", daemon=True,
                                         args=(self.args_dict, self._jobs, events, self._interrupt, self._skip))
        self.process.start()
        # one reader per process: it ends with its process, after reporting its death
        threading.Thread(target=self._read_events, args=(self.process, events), name=f"easel-{self.name}-events",
                         daemon=True).start()

    def _read_events(self, process, events) -> None:
        while not self._stopping:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if not process.is_alive() and not self._stopping:
                    self.sink(self, {"type": "dead", "exitcode": process.exitcode})
                    return
                continue
            except (EOFError, OSError):
                if self._stopping:
                    return
                time.sleep(0.2)
                continue
            self.sink(self, event)

    def send(self, message: dict) -> None:
        self._jobs.put(message)

    def interrupt(self) -> None:
        self.interrupted = True
        self._interrupt.value = 1

    def skip(self) -> None:
        self.skipped = True
        self._skip.value = 1

    def clear_flags(self) -> None:
        super().clear_flags()
        self._interrupt.value = 0
        self._skip.value = 0

    def stop(self) -> None:
        self._stopping = True
        try:
            self._jobs.put(None)
        except Exception:  # noqa: BLE001  the queue of a process already gone
            pass
        if self.process is not None:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()

    def kill(self) -> None:
        self._stopping = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()
