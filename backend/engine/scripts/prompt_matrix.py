"""A1111's "Prompt matrix": the prompt's parts after the first (separated by `|`) are switched on and off in every
combination, one picture per combination, shown in a grid whose legends name the parts (struck through where a
cell lacks them). Variable parts go after the first part, or before it ("Put variable parts at start"); the
negative prompt can be the one split instead ("Select prompt"). As A1111's, the combinations run in batches of the
job's batch size (batch count: as many batches as they need, the last one smaller), one generation per batch; each
picture uses the job's seed, or the seed plus its number ("Use different seed for each picture"), and the job's
variation seed plus its number.
"""
from __future__ import annotations

from backend.core.grid_legends import combination_labels, draw_grid_annotations
from backend.core.images import image_grid
from backend.core.scripts_catalog import prompt_matrix_combinations
from backend.engine.rng import fix_seed
from backend.engine.scripts.runner import pil_of


def run(args: dict, job, generate):
    from backend.engine.pipelines.processing import EachImage

    req = job.request
    positive = args["prompt_type"] == "positive"
    field = "prompt" if positive else "negative_prompt"
    original = req.prompt if positive else req.negative_prompt
    delimiter = ", " if args["variations_delimiter"] == "comma" else " "
    parts, prompts = prompt_matrix_combinations(original, args["put_at_start"], delimiter)
    seed, subseed = fix_seed(req.seed), fix_seed(req.subseed)
    seeds = [seed + (i if args["different_seeds"] else 0) for i in range(len(prompts))]
    subseeds = [subseed + i for i in range(len(prompts))]
    size = max(1, req.batch_size)
    batches = []
    for start in range(0, len(prompts), size):  # A1111: n_iter = ceil(combinations / batch_size)
        group = slice(start, start + size)
        texts = prompts[group]
        request = req.model_copy(update={"batch_size": len(texts), "n_iter": 1, "do_not_save_grid": True,
                                         "script_name": None, "script_args": [], field: texts[0],
                                         "seed": seeds[group][0], "subseed": subseeds[group][0]})
        other = req.negative_prompt if positive else req.prompt
        each = EachImage(prompts=texts if positive else [other] * len(texts),
                         negative_prompts=[other] * len(texts) if positive else texts,
                         seeds=seeds[group], subseeds=subseeds[group])
        batches.append((request, each))
    job.plan(len(batches), sum(job.steps_of(request) for request, _ in batches))

    images = []
    for request, each in batches:
        # the batch's <lora:...> tags are its first prompt's, as A1111's (extra networks parsed per batch)
        result = generate(request, job.init_images or None, each=each)
        images.extend(image for image in result.images if not image.is_grid)
    if not images:
        return job.answer([])
    pictures = [pil_of(image) for image in images]
    grid = image_grid(pictures, rows=1 << ((len(parts) - 1) // 2))
    columns, rows = combination_labels([part.strip() for part in parts[1:]])
    grid = draw_grid_annotations(grid, pictures[0].width, pictures[0].height, columns, rows, int(args["margin_size"]))
    grid_image = job.grid(grid, images[0], basename="prompt_matrix")
    return job.answer(([grid_image] if grid_image else []) + images,
                      {"prompt": req.prompt, "negative_prompt": req.negative_prompt})
