"""ScriptRun, the engine side of a selectable script, with a stand-in pipeline: one progress bar over all the
script's generations, Interrupt ending the script with the images made so far, a failing script named."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from backend.core.images import encode_png
from backend.core.schemas import GeneratedImage, GenerationResult, Txt2ImgRequest
from backend.engine.scripts.runner import ScriptRun


class Control:
    def __init__(self):
        self.events, self.stop = [], False

    def interrupted(self): return self.stop
    def skipped(self): return False
    def clear_skip(self): pass
    def begin(self, job_count, total_steps): self.events.append(("begin", job_count, total_steps))
    def set_job(self, job_no): self.events.append(("job", job_no))
    def step(self, preview): self.events.append(("step",))


def make_run(interrupt_after: int | None = None):
    control = Control()
    ctx = SimpleNamespace(control=control, options={"grid_save": False, "default_sampler": "Euler a"},
                          extra_params={}, warnings=[], outputs_root="/nonexistent", sampling=None)
    calls = []

    def pipeline(payload):
        req = payload["request"]
        ctx.control.begin(req.n_iter, req.steps * req.n_iter)
        for n in range(req.n_iter):
            ctx.control.set_job(n)
            for _ in range(req.steps):
                ctx.control.step(None)
        calls.append(dict(ctx.extra_params))
        text = f"{req.prompt}\nSteps: {req.steps}"
        image = GeneratedImage(png=encode_png(Image.new("RGB", (8, 8)), text), infotext=text, seed=req.seed,
                               subseed=0, prompt=req.prompt, negative_prompt="")
        if interrupt_after is not None and len(calls) >= interrupt_after:
            control.stop = True
        return GenerationResult(images=[image], info={"prompt": req.prompt}, interrupted=control.stop)

    req = Txt2ImgRequest(prompt="p", steps=2, n_iter=1, seed=3)
    return ScriptRun("txt2img", {"request": req}, ctx, pipeline), control, calls


def three_lines(args, job, generate):
    job.plan(3, 6)
    images = []
    for i in range(3):
        images += generate(job.request.model_copy(update={"prompt": f"line {i}"}), extra_params={"Line": i}).images
    return job.answer(images)


def test_one_progress_bar_over_the_generations():
    run, control, calls = make_run()
    result = run.run("test", three_lines, None)
    assert [e for e in control.events if e[0] != "step"] == [("begin", 3, 6), ("job", 0), ("job", 1), ("job", 2)]
    assert len([e for e in control.events if e[0] == "step"]) == 6
    assert result.info["all_prompts"] == ["line 0", "line 1", "line 2"] and not result.interrupted
    assert calls == [{"Line": 0}, {"Line": 1}, {"Line": 2}] and run.ctx.extra_params == {}


def test_interrupt_ends_the_script_with_what_was_made():
    run, control, calls = make_run(interrupt_after=2)
    result = run.run("test", three_lines, None)
    assert len(calls) == 2 and result.interrupted
    assert [i.prompt for i in result.images] == ["line 0", "line 1"]


def test_a_failing_script_is_named():
    def broken(args, job, generate):
        generate(job.request)
        raise KeyError("oops")

    run, _, _ = make_run()
    with pytest.raises(RuntimeError, match="Script 'broken' failed: KeyError"):
        run.run("broken", broken, None)


def test_matched_noise_keeps_the_picture_and_matches_its_colours():
    import numpy as np

    from backend.engine.scripts.outpainting_mk2 import matched_noise

    rng = np.random.default_rng(1)
    image = np.zeros((64, 64, 3))
    image[:, 32:] = rng.uniform(0.2, 0.4, (64, 32, 3))  # the kept half: dark-ish colours
    mask = np.zeros((64, 64))
    mask[:, :32] = 1.0  # the new half
    out = matched_noise(image, mask, 1.0, 0.05)
    assert np.array_equal(out[:, 32:], image[:, 32:])
    new = out[:, :32]
    assert new.std() > 0.01 and 0.19 <= new.min() and new.max() <= 0.41  # noise in the kept pixels' colour range
    assert np.array_equal(out, matched_noise(image, mask, 1.0, 0.05))  # deterministic, as A1111's
