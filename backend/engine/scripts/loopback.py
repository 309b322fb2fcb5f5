"""A1111's "Loopback" (img2img): each picture becomes the next loop's input, the denoising strength moving from
the job's to "Final denoising strength" along a curve (Aggressive: sine, Linear, Lazy: 1 - cosine), the seed
growing by one each loop. With batch count n, n chains start from the job's image; their last pictures are
shown (one chain: every loop's picture), after a one-row grid of them when there is more than one. With the
setting `img2img_color_correction` every loop's picture takes the colours of the job's image (not of its own
input), so the chain does not drift in colour. Skip ends the current chain (its picture is not kept; the next
chain starts), Interrupt ends the script with the pictures kept so far and their grid, as A1111's.
"Append interrogated prompt" (CLIP / DeepBooru) captions each loop's input picture with the interrogator and appends
the caption to the job's prompt for that loop, as A1111's (`backend.engine.interrogate`; its models are downloaded on
first use, and offline the job fails with the message naming the file).
"""
from __future__ import annotations

import math

from backend.engine.pipelines.common import format_number
from backend.engine.rng import fix_seed
from backend.engine.scripts.runner import pil_of


def denoising_strength(loop: int, loops: int, initial: float, final: float, curve: str) -> float:
    """The strength of loop `loop` (from 0), A1111's calculate_denoising_strength."""
    if loops == 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        share = math.sin(progress * math.pi * 0.5)
    elif curve == "Lazy":
        share = 1 - math.cos(progress * math.pi * 0.5)
    else:
        share = progress
    return initial + (final - initial) * share


def interrogated_prompt(prompt: str, picture, interrogator: str, job) -> str:
    """The loop's prompt: the job's, then the caption of the loop's input picture (A1111's joining)."""
    from backend.core.errors import UserError
    from backend.engine.interrogate.job import caption_for_script
    from backend.engine.scripts.runner import ScriptStopped

    model = {"CLIP": "clip", "DeepBooru": "deepdanbooru"}[interrogator]
    try:
        caption = caption_for_script(picture, model, job.ctx.interrogate, job.ctx.control, job.options)
    except UserError as exc:
        if job.interrupted:
            raise ScriptStopped() from exc
        raise
    return (f"{prompt}, " if prompt else "") + caption


def run(args: dict, job, generate):
    from backend.engine.scripts.runner import ScriptStopped

    req = job.request
    loops, final, curve = int(args["loops"]), float(args["final_denoising_strength"]), args["denoising_curve"]
    interrogator = args.get("append_interrogation") or "None"
    chains = req.n_iter
    initial = float(req.denoising_strength)
    params = {"Final denoising strength": format_number(final), "Denoising curve": curve}
    one = {"batch_size": 1, "n_iter": 1, "do_not_save_grid": True, "script_name": None, "script_args": []}
    strengths = [denoising_strength(i, loops, initial, final, curve) for i in range(loops)]
    job.plan(loops * chains, chains * sum(job.steps_of(req.model_copy(update={"denoising_strength": s}))
                                          for s in strengths))
    colours = job.init_images[:1] if job.options["img2img_color_correction"] else None

    seed = fix_seed(req.seed)
    shown = []
    stopped = False
    for _chain in range(chains):
        pictures = job.init_images
        fill = req.inpainting_fill
        last, skipped = None, False
        for loop in range(loops):
            update = {**one, "seed": seed, "denoising_strength": strengths[loop], "inpainting_fill": fill}
            try:
                if interrogator != "None":
                    update["prompt"] = interrogated_prompt(req.prompt, pictures[0], interrogator, job)
                result = generate(req.model_copy(update=update), pictures, extra_params=params, color_from=colours)
            except ScriptStopped:  # Interrupt: this loop's picture is not kept, nor are the chains after it
                stopped = True
                break
            seed += 1
            made = [image for image in result.images if not image.is_grid]
            skipped = job.skipped_last
            if skipped or not made:  # Skip: the rest of this chain's loops are not run
                break
            last = made[0]
            pictures = [pil_of(last)]
            fill = 1  # the next loops start from the picture: masked content "original"
            if chains == 1:
                shown.append(last)
        if stopped:
            break
        if chains > 1 and last is not None and not skipped:
            shown.append(last)
    images = list(shown)
    if len(shown) > 1:
        from backend.core.images import image_grid
        grid = job.grid(image_grid([pil_of(image) for image in shown], rows=1), shown[0])
        if grid is not None:
            images.insert(0, grid)
    return job.answer(images, {"denoising_strength": initial}, interrupted=stopped)
