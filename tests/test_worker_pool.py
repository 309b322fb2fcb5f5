"""The pool's policies without processes: fake workers behind a real `BackendClient` (routing, jobs sent to every
worker, the re-run once after a worker's death, interrupt/skip reaching the worker of the job, /progress of the oldest
running job), and the Ray transport's model-file shipping helpers."""
from __future__ import annotations

from pathlib import Path

import pytest

from backend.checkpoints import ModelFile
from backend.client import BackendClient, BackendError
from backend.workers.base import WorkerHandle


class FakeWorker(WorkerHandle):
    """Records what it is sent; the test answers for it through the pool's event handler."""

    def __init__(self, name, index, sink):
        super().__init__(name, index, sink)
        self.sent: list[dict] = []
        self.starts = 0
        self.interrupts = self.skips = 0

    def start(self):
        self.starts += 1
        self.sink(self, {"type": "ready", "pid": 1000 * (self.index + 1) + self.starts, "device": "cpu",
                         "checkpoints": []})

    def send(self, message):
        self.sent.append(message)

    def interrupt(self):
        self.interrupted = True
        self.interrupts += 1

    def skip(self):
        self.skipped = True
        self.skips += 1

    def stop(self):
        pass

    def kill(self):
        pass

    def answer(self, loaded: list[str] | None = None, result="ok"):
        message = self.sent[-1]
        self.sink(self, {"type": "result", "job_id": message["job_id"], "result": result,
                         "checkpoints": loaded if loaded is not None else self.checkpoints})


class FakePool(BackendClient):
    def _make_workers(self):
        return [FakeWorker(f"worker-{i + 1}", i, self._on_event) for i in range(self.worker_count)]


def ckpt(name: str) -> dict:
    return {"checkpoint": ModelFile(name=name, path=Path(f"/models/{name}"))}


@pytest.fixture()
def pool():
    client = FakePool({}, workers=3)
    client.start()
    assert client.wait_ready(1)
    return client


def test_routing_prefers_the_worker_with_the_checkpoint_then_an_empty_one(pool):
    w1, w2, w3 = pool.workers
    first = pool.submit("txt2img", ckpt("a.safetensors"))
    assert first.worker == "worker-1"
    w1.answer(["/models/a.safetensors"])
    second = pool.submit("txt2img", ckpt("b.safetensors"))
    assert second.worker == "worker-2"  # an idle worker with nothing loaded, not worker-1 (which has a)
    w2.answer(["/models/b.safetensors"])
    for _ in range(3):  # b's jobs go to worker-2 although worker-3 has not worked yet
        job = pool.submit("txt2img", ckpt("b.safetensors"))
        assert job.worker == "worker-2"
        w2.answer()
    job = pool.submit("txt2img", ckpt("a.safetensors"))
    assert job.worker == "worker-1"
    w1.answer()
    # c: the empty worker-3; then, all holding something, the least recently used
    assert pool.submit("txt2img", ckpt("c.safetensors")).worker == "worker-3"
    w3.answer(["/models/c.safetensors"])
    assert pool.submit("txt2img", ckpt("d.safetensors")).worker == "worker-2"  # worker-1 worked after it


def test_busy_workers_leave_jobs_queued_in_order(pool):
    jobs = [pool.submit("txt2img", ckpt("a.safetensors")) for _ in range(5)]
    assert [j.worker for j in jobs[:3]] == ["worker-1", "worker-2", "worker-3"]
    assert [j.status for j in jobs[3:]] == ["queued", "queued"]
    assert pool.position(jobs[3]) == 0 and pool.position(jobs[4]) == 1
    pool.workers[1].answer(["/models/a.safetensors"])
    assert jobs[3].worker == "worker-2" and jobs[3].status == "running"


def test_unload_reaches_every_worker_and_ends_when_all_answered(pool):
    job = pool.submit("unload", {})
    assert [len(w.sent) for w in pool.workers] == [1, 1, 1]
    assert {w.sent[0]["kind"] for w in pool.workers} == {"unload"}
    for worker in pool.workers[:2]:
        worker.answer([], result={"ok": True})
    assert not job.done.is_set()
    pool.workers[2].answer([], result={"ok": True})
    assert job.done.is_set() and job.result == {"ok": True}
    assert pool.queued() == 0


def test_a_job_whose_worker_dies_runs_again_once_then_fails(pool):
    w1, w2, w3 = pool.workers
    job = pool.submit("txt2img", ckpt("a.safetensors"))
    behind = [pool.submit("txt2img", ckpt("a.safetensors")) for _ in range(2)]
    assert job.worker == "worker-1"
    first_entropy = w1.sent[-1]["entropy"]
    w1.sink(w1, {"type": "dead", "exitcode": -9})
    assert w1.restarts == 1 and w1.starts == 2  # restarted (the fake is ready at once)
    # the others busy, the restarted worker takes the same job again (at the head of the queue)
    assert job.status == "running" and job.runs == 2 and w1.sent[-1]["job_id"] == job.job_id
    assert w1.sent[-1]["payload"] is job.payload  # the same payload: the same seed
    # and the same random state for the seeds the worker draws (-1): the same picture for random seeds too
    assert w1.sent[-1]["entropy"] == first_entropy and behind[0].entropy != first_entropy
    assert [b.status for b in behind] == ["running", "running"]  # the queued jobs went on
    w1.sink(w1, {"type": "dead", "exitcode": -9})
    assert job.done.is_set() and isinstance(job.error, BackendError)
    assert "exit code -9" in job.error.message and "lost again" in job.error.message
    assert [w["state"] for w in pool.workers_state()] == ["idle", "busy", "busy"]


def test_interrupt_and_skip_reach_the_worker_of_the_job(pool):
    first = pool.submit("txt2img", ckpt("a.safetensors"))
    second = pool.submit("txt2img", ckpt("b.safetensors"))
    pool.interrupt(second.job_id)
    assert [w.interrupts for w in pool.workers] == [0, 1, 0]
    pool.skip(first.job_id)
    assert [w.skips for w in pool.workers] == [1, 0, 0]
    pool.interrupt()  # A1111's /sdapi/v1/interrupt: every running job
    assert [w.interrupts for w in pool.workers] == [1, 2, 0]
    state = pool.progress_state()  # the oldest running job
    assert state["current_task"] == first.job_id and state["state"]["skipped"] is True
    pool.workers[0].answer()
    assert pool.progress_state()["current_task"] == second.job_id
    assert pool.progress_state()["state"]["interrupted"] is True


def test_model_files_are_listed_and_replaced_by_the_nodes_copies(tmp_path):
    from backend.workers.ray_actor import EaselActor, localize, model_files

    a, v, b = (ModelFile(name=n, path=tmp_path / n) for n in ("a.safetensors", "v.pt", "b.safetensors"))
    payload = {"checkpoint": a, "vae": v, "checkpoint_fallbacks": [(b, None)], "parts": [], "other": 1}
    assert model_files(payload) == [str(a.path), str(v.path), str(b.path)]
    actor = EaselActor.__new__(EaselActor)  # its file handling only (no device state)
    actor.copies, actor.copy_dir = {}, tmp_path / "node"
    assert actor.missing([str(a.path)]) == [str(a.path)]
    local = actor.receive(str(a.path), b"weights")
    assert Path(local).read_bytes() == b"weights" and Path(local).name == "a.safetensors"
    assert actor.missing([str(a.path)]) == []
    moved = localize(payload, actor.copies)
    assert moved["checkpoint"].path == Path(local) and moved["checkpoint"].name == "a.safetensors"
    assert moved["vae"] is v and moved["checkpoint_fallbacks"] == [(b, None)] and moved["other"] == 1
    assert payload["checkpoint"] is a  # the app's payload is not changed


def test_a_jobs_entropy_fixes_the_random_seeds_the_worker_draws(monkeypatch):
    """The worker seeds Python's `random` with the job's entropy before running it: seed -1 resolves the same way
    on each run of the job (the re-run after a worker's death), differently for different jobs."""
    import backend.engine.worker as worker_module
    from backend.engine.rng import fix_seed

    drawn = []  # the engine replaced by one that records what seed -1 resolves to
    monkeypatch.setattr(worker_module, "run_job", lambda kind, payload, state, control: drawn.append(fix_seed(-1)) or {})
    monkeypatch.setattr(worker_module, "loaded_checkpoints", lambda state: [])
    for entropy in (11, 11, 12):
        worker_module.answer_job({"job_id": "j", "kind": "txt2img", "payload": {}, "entropy": entropy}, None, None)
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]


def test_how_many_workers_by_default(monkeypatch, tmp_path):
    """--backend-workers wins; else one per --device-id entry; else one per visible NVIDIA GPU (CUDA_VISIBLE_DEVICES,
    else `nvidia-smi -L`), except on the CPU or a Ray cluster; else one."""
    from backend.core.cmd_args import backend_workers, build_parser

    def count(*flags):
        return backend_workers(build_parser().parse_args(list(flags)))

    fake_smi = tmp_path / "nvidia-smi"  # lists three GPUs, as the real one does
    fake_smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n"
                        "echo 'GPU 2: NVIDIA H100 (UUID: c)'\n")
    fake_smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert count() == 3
    assert count("--backend-workers", "2") == 2
    assert count("--device-id", "0,1") == 2 and count("--device-id", "1") == 1
    assert count("--use-cpu", "all") == 1 and count("--ray-address", "auto") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert count() == 1  # no GPU visible: one worker (on the CPU)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert count() == 1  # no nvidia-smi: no NVIDIA GPU


def test_stopping_answers_the_queued_and_running_jobs_with_a_503(pool):
    w1, w2, w3 = pool.workers
    running = [pool.submit("txt2img", ckpt(f"{n}.safetensors")) for n in "abc"]
    queued = pool.submit("txt2img", ckpt("a.safetensors"))
    assert [j.status for j in running] == ["running"] * 3 and queued.status == "queued"
    pool.stop()
    for job in running + [queued]:  # their requests answer now, not when a worker that will not return would
        assert job.done.is_set() and isinstance(job.error, BackendError), job.status
        assert job.error.status == 503 and "shutting down" in job.error.message
    assert [w.interrupts for w in pool.workers] == [1, 1, 1]  # the running jobs stop, so the workers end cleanly
    w1.answer()  # an interrupted job's late answer changes nothing
    assert running[0].error.status == 503 and all(w["job"] is None for w in pool.workers_state())
