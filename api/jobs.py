"""Running a backend job from an API route without holding a web server thread while it waits.

The job is built and queued on a worker thread (validation, image decoding: quick),
then awaited on the event loop, so a long queue never starves the thread pool that
every other route (progress, interrupt, the UI) needs.
"""
from __future__ import annotations

from typing import Any, Callable

from starlette.concurrency import run_in_threadpool

from backend.client import Job


async def run_job(submit: Callable[..., Job], *args, timeout: float | None = None, **kwargs) -> Any:
    """`submit(*args, **kwargs)` on a worker thread, then the job's result (or its error raised), awaited."""
    job = await run_in_threadpool(submit, *args, **kwargs)
    return await job.outcome(timeout)
