"""A1111's "Prompt matrix": the prompt's parts after the first (separated by `|`) are switched on and off in every
combination, one picture per combination, shown in a grid whose legends name the parts (struck through where a
cell lacks them). Variable parts go after the first part, or before it ("Put variable parts at start"); the
negative prompt can be the one split instead ("Select prompt"). Each picture uses the job's seed, or the seed
plus its number ("Use different seed for each picture").
"""
from __future__ import annotations

from backend.core.grid_legends import combination_labels, draw_grid_annotations
from backend.core.images import image_grid
from backend.core.scripts_catalog import prompt_matrix_combinations
from backend.engine.rng import fix_seed
from backend.engine.scripts.runner import pil_of


def run(args: dict, job, generate):
    req = job.request
    positive = args["prompt_type"] == "positive"
    original = req.prompt if positive else req.negative_prompt
    delimiter = ", " if args["variations_delimiter"] == "comma" else " "
    parts, prompts = prompt_matrix_combinations(original, args["put_at_start"], delimiter)
    seed = fix_seed(req.seed)
    one = {"batch_size": 1, "n_iter": 1, "do_not_save_grid": True, "script_name": None, "script_args": []}
    requests = [req.model_copy(update={**one, ("prompt" if positive else "negative_prompt"): prompt,
                                       "seed": seed + (i if args["different_seeds"] else 0)})
                for i, prompt in enumerate(prompts)]
    job.plan(len(requests), sum(job.steps_of(r) for r in requests))

    images = []
    for request in requests:
        images.extend(image for image in generate(request, job.init_images or None).images if not image.is_grid)
    if not images:
        return job.answer([])
    pictures = [pil_of(image) for image in images]
    grid = image_grid(pictures, rows=1 << ((len(parts) - 1) // 2))
    columns, rows = combination_labels([part.strip() for part in parts[1:]])
    grid = draw_grid_annotations(grid, pictures[0].width, pictures[0].height, columns, rows, int(args["margin_size"]))
    grid_image = job.grid(grid, images[0], basename="prompt_matrix")
    return job.answer(([grid_image] if grid_image else []) + images,
                      {"prompt": req.prompt, "negative_prompt": req.negative_prompt})
