"""The generation tabs' job events without a browser: a full queue is said clearly; a reloaded page reattaches only
to the job it holds the key of, and shows its result as the Generate button's own event does."""
from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

from PIL import Image

from backend.client import BackendClient
from backend.core.errors import QueueFull
from backend.core.schemas import GeneratedImage, GenerationResult
from ui import generation


def collect(agen) -> list[tuple]:
    async def run():
        return [update async for update in agen]
    return asyncio.run(run())


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def fake_service() -> SimpleNamespace:
    return SimpleNamespace(client=BackendClient({}))  # never started: jobs stay queued until finished by hand


def finished_job(service, seed: int = 77):
    job = service.client.submit("txt2img", {})
    result = GenerationResult(images=[GeneratedImage(png=png("red"), infotext=f"a fox\nSteps: 3, Seed: {seed}",
                                                     seed=seed, subseed=seed, prompt="a fox", negative_prompt="")],
                              info={})
    service.client._finish(job, result=result)
    return job


def part(update: tuple, name: str):
    """One named part of a generation event's update (`generation.RESULT_PARTS`)."""
    return update[generation.RESULT_PARTS.index(name)]


def value(update):
    """The value a part is set to (a gr.update's "value", or the plain value)."""
    return update.get("value") if isinstance(update, dict) and update.get("__type__") == "update" else update


def test_a_full_queue_is_shown_as_a_clear_error():
    def start():
        raise QueueFull("The queue is full: 5 jobs are waiting.", retry_after=3)

    updates = collect(generation.stream_job(fake_service(), start))
    assert len(updates) == 1
    info = part(updates[0], "info")
    assert "easel-error" in info and "The queue is full" in info
    assert "The queue is full" in part(updates[0], "status")  # next to Generate too
    assert value(part(updates[0], "generate")) == "Generate"


def test_generate_stores_the_job_key_first_and_clears_it_with_the_result():
    service = fake_service()
    job = finished_job(service)
    updates = collect(generation.stream_job(service, lambda: job))
    assert part(updates[0], "job_ref") == {"job_id": job.job_id, "key": job.watch_key}
    assert part(updates[0], "interrupt")["visible"] is True  # Interrupt and Skip while the job lasts
    last = updates[-1]
    assert len(value(part(last, "gallery"))) == 1 and "Seed: 77" in part(last, "info") and part(last, "last_seed") == 77
    assert part(last, "job_ref") == generation.NO_JOB
    assert value(part(last, "generate")) == "Generate" and part(last, "interrupt")["visible"] is False


def test_reattach_shows_the_result_of_the_job_the_browser_holds_the_key_of():
    service = fake_service()
    job = finished_job(service, seed=91)
    updates = collect(generation.reattach(service, {"job_id": job.job_id, "key": job.watch_key}))
    last = updates[-1]
    assert len(value(part(last, "gallery"))) == 1 and "Seed: 91" in part(last, "info") and part(last, "last_seed") == 91
    assert part(last, "job_ref") == generation.NO_JOB  # shown: the next reload starts empty


def test_reattach_never_shows_a_job_without_its_key():
    service = fake_service()
    job = finished_job(service)
    for ref in ({"job_id": job.job_id, "key": "guessed"}, {"job_id": job.job_id}, {"job_id": "job-1", "key": ""}):
        updates = collect(generation.reattach(service, ref))
        assert len(updates) == 1
        shown = [u for name, u in zip(generation.RESULT_PARTS, updates[0]) if name != "job_ref"]
        assert all(u == {"__type__": "update"} for u in shown), shown  # nothing shown
        assert part(updates[0], "job_ref") == generation.NO_JOB  # the stale reference is dropped
    updates = collect(generation.reattach(service, None))  # a browser that never started a job
    assert len(updates) == 1 and all(u == {"__type__": "update"} for u in updates[0])


def test_reattach_stops_once_the_page_generates_again():
    service = fake_service()
    job = service.client.submit("txt2img", {})  # still queued
    presses = generation.GeneratePresses(keep=2)
    pressed = presses.of("page")

    async def run():
        updates = []
        async for update in generation.reattach(service, {"job_id": job.job_id, "key": job.watch_key},
                                                still_wanted=lambda: presses.of("page") == pressed):
            updates.append(update)
            if len(updates) == 1:
                presses.count("page")  # Generate pressed in the same page
                finished = finished_job(service)
                service.client._finish(job, result=finished.result)
        return updates

    updates = asyncio.run(run())
    assert len(updates) == 1 and "Waiting in queue" in part(updates[0], "progress")  # then nothing: no result shown
    presses.count("other page")
    presses.count("third page")
    assert presses.of("page") == 0 and presses.of("third page") == 1  # only the most recent pages are kept
