"""A1111's "Prompts from file or textbox": one generation per line of the script's text, each line a prompt or
options (`--prompt "..." --steps 10 ...`, parsed and checked by the app: `backend.core.prompt_file_lines`), with
the job's other settings. "Iterate seed every line" moves the seed on by each line's image count; "Use same
random seed for all lines" draws one random seed for all of them. No grid, as A1111.
"""
from __future__ import annotations

from backend.engine.rng import fix_seed


def run(args: dict, job, generate):
    req = job.request
    seed = req.seed
    if (args["checkbox_iterate"] or args["checkbox_iterate_batch"]) and seed == -1:
        seed = fix_seed(-1)
    plain = {"do_not_save_grid": True, "script_name": None, "script_args": []}
    lines = [req.model_copy(update={**plain, **update}) for update in args["lines"]]
    job.plan(sum(r.n_iter for r in lines), sum(job.steps_of(r) * r.n_iter for r in lines))

    images = []
    for update, request in zip(args["lines"], lines):
        if "seed" not in update:  # A1111: a line's --seed wins over the iterated one
            request = request.model_copy(update={"seed": seed})
        images.extend(image for image in generate(request, job.init_images or None).images if not image.is_grid)
        if args["checkbox_iterate"]:
            seed = seed + req.batch_size * req.n_iter
    return job.answer(images, {"prompt": req.prompt})
