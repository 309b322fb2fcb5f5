"""The backend client's queue, without a backend process: the bound (QueueFull, 503 + Retry-After), jobs kept by id
for reattaching (only with their key), and awaiting a job from asyncio without a thread."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from backend import client as client_module
from backend.client import BackendClient, BackendError
from backend.core.errors import QueueFull, UserError


def idle_client(limit: int | None = None) -> BackendClient:
    """A client whose backend never becomes ready: submitted jobs stay queued."""
    return BackendClient({}, queue_limit=(lambda: limit) if limit is not None else None)


def test_the_queue_refuses_past_its_bound_with_retry_after():
    client = idle_client(limit=3)
    for _ in range(3):
        client.submit("txt2img", {})
    with pytest.raises(QueueFull) as refused:
        client.submit("txt2img", {})
    assert refused.value.status == 503 and isinstance(refused.value, UserError)
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "queue_max_jobs" in refused.value.message
    assert client.queued() == 3


def test_the_api_answers_a_full_queue_with_503_retry_after_in_a1111_shape():
    from api.errors import error_response
    response = error_response(None, QueueFull("The queue is full.", retry_after=7))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert json.loads(response.body) == {"error": "UserError", "detail": "The queue is full.", "body": "",
                                         "errors": "The queue is full."}


def test_jobs_are_found_only_with_their_key_and_forgotten_after_a_while():
    client = idle_client()
    jobs = [client.submit("txt2img", {}) for _ in range(client_module.KEEP_FINISHED_JOBS + 5)]
    first = jobs[0]
    assert client.find_job(first.job_id, first.watch_key) is first
    assert client.find_job(first.job_id, jobs[1].watch_key) is None  # another job's key
    assert client.find_job(first.job_id, "") is None
    assert client.find_job("job-999999", first.watch_key) is None
    for job in jobs:
        client._finish(job, result="done")
    client.submit("txt2img", {})  # finished jobs are pruned when jobs are added
    assert client.find_job(first.job_id, first.watch_key) is None  # the oldest finished ones are gone
    last = jobs[-1]
    assert client.find_job(last.job_id, last.watch_key) is last  # the recent ones are kept, result and all
    assert last.result == "done"


def test_finished_jobs_expire(monkeypatch):
    client = idle_client()
    job = client.submit("txt2img", {})
    client._finish(job, result="done")
    monkeypatch.setattr(client_module, "KEEP_FINISHED_S", 0.0)
    time.sleep(0.01)
    client.submit("txt2img", {})
    assert client.find_job(job.job_id, job.watch_key) is None


def test_a_job_is_awaited_without_a_thread_and_its_error_raised():
    client = idle_client()
    job = client.submit("txt2img", {})
    failing = client.submit("txt2img", {})

    async def scenario():
        assert await job.wait_async(0.05) is False  # still queued
        threading.Timer(0.1, lambda: client._finish(job, result=42)).start()
        assert await job.outcome(timeout=30) == 42
        threading.Timer(0.1, lambda: client._finish(failing, error=BackendError("boom"))).start()
        with pytest.raises(BackendError, match="boom"):
            await failing.outcome(timeout=30)
        assert not job.listeners and not failing.listeners  # the waiters' listeners are removed

    asyncio.run(scenario())
