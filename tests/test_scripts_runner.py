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


def make_loopback(n_iter: int, color_correction: bool = False, skip_on: int | None = None,
                  interrupt_on: int | None = None):
    """Loopback's engine part over a stand-in img2img pipeline: call number `skip_on` has its batch skipped (the
    pipeline clears Skip, as `Generation.end_batch` does), call `interrupt_on` is interrupted."""
    from backend.core.schemas import Img2ImgRequest

    control = Control()
    ctx = SimpleNamespace(control=control, options={"grid_save": False, "return_grid": True,
                                                     "img2img_color_correction": color_correction,
                                                     "img2img_fix_steps": False},
                          extra_params={}, warnings=[], outputs_root="/nonexistent", sampling=None)
    calls = []
    first = Image.new("RGB", (8, 8), (200, 30, 30))

    def pipeline(payload):
        req = payload["request"]
        calls.append(payload)
        if len(calls) == skip_on:
            ctx.control.clear_skip()
        if len(calls) == interrupt_on:
            control.stop = True
        text = f"{req.prompt}\nSeed: {req.seed}"
        image = GeneratedImage(png=encode_png(Image.new("RGB", (8, 8), (len(calls), 0, 0)), text), infotext=text,
                               seed=req.seed, subseed=0, prompt=req.prompt, negative_prompt="")
        return GenerationResult(images=[image], info={"seed": req.seed}, interrupted=control.stop)

    req = Img2ImgRequest(prompt="p", steps=2, n_iter=n_iter, seed=3, denoising_strength=0.6)
    payload = {"request": req, "init_images": [first], "mask": None}
    return ScriptRun("img2img", payload, ctx, pipeline), calls, first


LOOPBACK = {"loops": 3, "final_denoising_strength": 0.3, "denoising_curve": "Linear", "append_interrogation": "None"}


def shown(result):
    return [(i.is_grid, i.seed) for i in result.images]


def test_loopback_skip_ends_the_chain_and_the_next_chain_starts():
    from backend.engine.scripts import loopback

    run, calls, first = make_loopback(n_iter=3, skip_on=2)
    result = run.run("Loopback", loopback.run, LOOPBACK)
    # chain 1: loops 1 and 2 (skipped: its picture is not kept, its last loop is not run); chains 2 and 3 whole
    assert [c["request"].seed for c in calls] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert shown(result) == [(True, 7), (False, 7), (False, 10)] and not result.interrupted
    # each chain starts from the job's image; the next loop from the picture before it
    assert calls[2]["init_images"] == [first] and calls[5]["init_images"] == [first]
    assert calls[3]["init_images"][0].getpixel((0, 0)) == (3, 0, 0)


def test_loopback_skip_in_one_chain_keeps_the_loops_before_it():
    from backend.engine.scripts import loopback

    run, calls, _ = make_loopback(n_iter=1, skip_on=3)
    result = run.run("Loopback", loopback.run, dict(LOOPBACK, loops=5))
    assert len(calls) == 3 and shown(result) == [(True, 3), (False, 3), (False, 4)]


def test_loopback_interrupt_keeps_the_pictures_made_and_their_grid():
    from backend.engine.scripts import loopback

    run, calls, _ = make_loopback(n_iter=1, interrupt_on=3)
    result = run.run("Loopback", loopback.run, dict(LOOPBACK, loops=5))
    assert len(calls) == 3 and result.interrupted
    assert shown(result) == [(True, 3), (False, 3), (False, 4)]  # the interrupted loop's picture is not kept

    run, calls, _ = make_loopback(n_iter=3, interrupt_on=4)  # in the second chain: no chain after it runs
    result = run.run("Loopback", loopback.run, LOOPBACK)
    assert len(calls) == 4 and result.interrupted and shown(result) == [(False, 5)]


def test_loopback_one_picture_has_no_grid():
    from backend.engine.scripts import loopback

    run, calls, _ = make_loopback(n_iter=1)
    result = run.run("Loopback", loopback.run, dict(LOOPBACK, loops=1))
    assert shown(result) == [(False, 3)]


def test_loopback_colour_correction_matches_every_loop_to_the_first_picture():
    from backend.engine.scripts import loopback

    run, calls, first = make_loopback(n_iter=2, color_correction=True)
    run.run("Loopback", loopback.run, LOOPBACK)
    assert len(calls) == 6 and all(c["color_correction_from"] == [first] for c in calls)
    run, calls, _ = make_loopback(n_iter=1)
    run.run("Loopback", loopback.run, LOOPBACK)
    assert all("color_correction_from" not in c for c in calls)  # the setting off: no correction


def test_colour_correction_takes_the_target_colours_and_keeps_the_luminosity():
    import numpy as np

    from backend.engine.pipelines.color_correction import apply_color_correction, correction_target

    rng = np.random.default_rng(0)
    grey = Image.fromarray((rng.uniform(40, 220, (32, 32, 1)) * np.ones((1, 1, 3))).astype(np.uint8))
    target = Image.fromarray(np.stack([rng.uniform(150, 250, (16, 16)), rng.uniform(10, 60, (16, 16)),
                                       rng.uniform(10, 60, (16, 16))], axis=-1).astype(np.uint8))
    out = np.asarray(apply_color_correction(correction_target(target), grey), dtype=np.float32)
    r, g, b = out[..., 0].mean(), out[..., 1].mean(), out[..., 2].mean()
    assert r > g + 40 and r > b + 40  # red, as the target
    lum = lambda a: a[..., 0] * 0.3 + a[..., 1] * 0.59 + a[..., 2] * 0.11  # noqa: E731
    source = np.asarray(grey, dtype=np.float32)
    assert np.abs(lum(out) - lum(source)).mean() < 6  # its own light and dark
    assert np.corrcoef(lum(out).ravel(), lum(source).ravel())[0, 1] > 0.95


def test_prompt_matrix_batches_its_combinations_as_a1111():
    """batch size 3, 4 combinations: two generations (3 + 1 pictures), each picture with its own prompt, all with
    the job's seed (different seeds: the seed plus the picture's number); the grid first."""
    from backend.engine.scripts import prompt_matrix

    for different, seeds in ((False, [5, 5, 5, 5]), (True, [5, 6, 7, 8])):
        control = Control()
        ctx = SimpleNamespace(control=control, options={"grid_save": False, "return_grid": True},
                              extra_params={}, warnings=[], outputs_root="/nonexistent", sampling=None)
        calls = []

        def pipeline(payload):
            req, each = payload["request"], payload["each_image"]
            calls.append((req.batch_size, req.n_iter, req.prompt, list(each.prompts), list(each.seeds),
                          list(each.subseeds), list(each.negative_prompts)))
            images = [GeneratedImage(png=encode_png(Image.new("RGB", (8, 8)), p), infotext=p, seed=s, subseed=v,
                                     prompt=p, negative_prompt=n)
                      for p, s, v, n in zip(each.prompts, each.seeds, each.subseeds, each.negative_prompts)]
            return GenerationResult(images=images, info={})

        req = Txt2ImgRequest(prompt="cat|red|hat", negative_prompt="ugly", steps=2, batch_size=3, n_iter=5,
                             seed=5, subseed=40)
        run = ScriptRun("txt2img", {"request": req}, ctx, pipeline)
        args = {"put_at_start": False, "different_seeds": different, "prompt_type": "positive",
                "variations_delimiter": "comma", "margin_size": 0}
        result = run.run("Prompt matrix", prompt_matrix.run, args)
        prompts = ["cat", "cat, red", "cat, hat", "cat, red, hat"]
        assert calls == [(3, 1, "cat", prompts[:3], seeds[:3], [40, 41, 42], ["ugly"] * 3),
                         (1, 1, "cat, red, hat", prompts[3:], seeds[3:], [43], ["ugly"])]
        assert [(i.is_grid, i.prompt, i.seed) for i in result.images] == \
            [(True, "cat", seeds[0])] + [(False, p, s) for p, s in zip(prompts, seeds)]
        assert [e for e in control.events if e[0] == "begin"] == [("begin", 2, 4)]  # two batches, 2 steps each
