"""The X/Y/Z plot's run, as AUTOMATIC1111's: one ordinary generation per cell, then the grids.

``run(plan, job, generate) -> GenerationResult``

`plan` is the `XYZPlan` the app parsed and checked (`backend.core.xyz_axes.parse_xyz_args`); `generate(request)`
runs one ordinary generation in-process and returns its `GenerationResult`; `job` is the script's job: anything
with `request` (the base pydantic request), `options` (the settings, with the job's overrides), `outputs_root`
(what relative output folders are under) and, optionally, `warnings` (a list the run adds to) and `interrupted`
(a callable: True once the user pressed Interrupt). `ScriptJob` is such an object.

What it does, in A1111's order:

1. The seeds are fixed once (unless "Keep -1 for seeds"): a -1 seed or variation seed of the request, and -1
   values of a Seed / Var. seed axis, become one random seed each, so every cell shares them. "Vary seeds for
   X/Y/Z" adds the cell's index along those axes to the seed.
2. The cells run with the costliest axis outermost (a checkpoint or VAE axis changes as rarely as possible);
   each cell is the base request with the cell's values applied (`cell_request`: fields, `override_settings`
   for checkpoint, VAE and clip skip, Prompt S/R, Prompt order); a cell of an extension's axis ("[ControlNet]
   Weight") runs with the always-on scripts the app parsed for it (`job.always_on_variants`, by
   `plan.always_on_key`). A cell contributes its first image.
3. One grid per Z value (X across, Y down, legends above and left, `margin_size` pixels between cells), then the
   grid of those grids with the Z values above. The answer: the main grid first, the sub-grids when
   "Include Sub Grids", then each cell's image when "Include Sub Images"; `infotexts` for each. The grids'
   infotexts are the first cell's with ``Script``, ``X Type``, ``X Values`` (``Fixed X Values`` for seeds), ...
4. The main grid (and the sub-grids with "Include Sub Grids" and several Z values) is saved to the tab's grids
   folder as ``NNNNN-xyz_grid-SEED.png`` when grids are saved (`grid_save`, and the request does not say
   `do_not_save_grid`).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from backend.engine.a1111_callbacks import save_hooks  # the extensions' on_(before_)image_saved
from backend.core.errors import JobInterrupted
from backend.core.grid_legends import GridAnnotation, draw_grid_annotations, layout_grid
from backend.core.job_options import JobOptions
from backend.core.images import ImageFormat, day_folder, encode_png, save_image_or_warn
from backend.core.infotext import format_value, quote
from backend.core.schemas import GeneratedImage, GenerationResult
from backend.core.xyz_axes import SCRIPT_TITLE, Axis, XYZPlan, cell_request
from backend.engine.scripts.runner import ScriptStopped

SEED_AXES = ("Seed", "Var. seed")
RANDOM_SEED_RANGE = 4294967294  # A1111's get_fixed_seed


@dataclass
class ScriptJob:
    """What `run` needs of the job (the scripts framework may pass any object with these attributes)."""
    request: Any
    options: Mapping[str, Any]
    outputs_root: Path
    warnings: list[str] = field(default_factory=list)
    interrupted: Callable[[], bool] = lambda: False


def _random_seed() -> int:
    return int(random.randrange(RANDOM_SEED_RANGE))


def _fixed_axis_values(axis: Axis, keep_random: bool) -> tuple:
    if keep_random or axis.type.label not in SEED_AXES:
        return axis.values
    return tuple(_random_seed() if v in (None, "", -1) else v for v in axis.values)


def with_params(infotext: str, params: Mapping[str, object]) -> str:
    """`infotext` with more parameters appended to its parameters line (A1111's extra_generation_params)."""
    items = []
    for key, value in params.items():
        text = format_value(value)
        if text is not None:
            items.append(f"{key}: {quote(text)}")
    if not items:
        return infotext
    lines = infotext.split("\n")
    last = lines[-1]
    if ": " in last and not last.startswith("Negative prompt:"):
        lines[-1] = f"{last}, {', '.join(items)}"
    else:
        lines.append(", ".join(items))
    return "\n".join(lines)


def _axis_params(axis: Axis, values: tuple, keep_random: bool) -> dict[str, object]:
    if axis.is_nothing:
        return {}
    params: dict[str, object] = {f"{axis.name} Type": axis.type.label, f"{axis.name} Values": axis.text}
    if axis.type.label in SEED_AXES and not keep_random:
        params[f"Fixed {axis.name} Values"] = ", ".join(str(v) for v in values)
    return params


def run(plan: XYZPlan, job, generate: Callable[[Any], GenerationResult]) -> GenerationResult:
    options = JobOptions.of(job.options)
    interrupted = getattr(job, "interrupted", None) or (lambda: False)
    warnings: list[str] = getattr(job, "warnings", None)
    if warnings is None:
        warnings = []
    base = job.request
    update: dict[str, Any] = {}
    if not plan.no_fixed_seeds:
        update["seed"] = _random_seed() if base.seed in (None, -1) else base.seed
        update["subseed"] = _random_seed() if base.subseed in (None, -1) else base.subseed
    if not options["return_grid"]:
        update["batch_size"] = 1
    base = base.model_copy(update=update)

    xs, ys, zs = (_fixed_axis_values(a, plan.no_fixed_seeds) for a in plan.axes)
    nx, ny, nz = len(xs), len(ys), len(zs)
    count = nx * ny * nz
    if hasattr(job, "plan"):  # one progress bar over every cell (the scripts framework's ScriptRun)
        steps = sum(job.steps_of(cell_request(base, [(plan.x.type, xs[ix], xs), (plan.y.type, ys[iy], ys),
                                                     (plan.z.type, zs[iz], zs)]))
                    for ix, iy, iz in plan.cells())
        job.plan(count * base.n_iter, steps * base.n_iter)
    variants = getattr(job, "always_on_variants", None) or {}  # cells' own always-on scripts (extension axes)
    images: list[Image.Image | None] = [None] * count
    outputs: list[GeneratedImage | None] = [None] * count
    first_result: GenerationResult | None = None
    was_interrupted = False

    for ix, iy, iz in plan.cells():
        if interrupted():
            was_interrupted = True
            break
        req = cell_request(base, [(plan.x.type, xs[ix], xs), (plan.y.type, ys[iy], ys), (plan.z.type, zs[iz], zs)])
        if req.seed not in (None, -1):  # vary seeds along the axes (a random -1 seed stays random)
            seed = req.seed
            xdim = nx if plan.vary_seeds_x else 1
            ydim = ny if plan.vary_seeds_y else 1
            seed += ix if plan.vary_seeds_x else 0
            seed += iy * xdim if plan.vary_seeds_y else 0
            seed += iz * xdim * ydim if plan.vary_seeds_z else 0
            req = req.model_copy(update={"seed": seed})
        try:
            key = plan.always_on_key((ix, iy, iz))
            result = generate(req, scripts=variants[key]) if key in variants else generate(req)
        except (JobInterrupted, ScriptStopped):  # Interrupt: the cells made so far, the rest left black
            was_interrupted = True
            break
        for w in result.warnings:
            if w not in warnings:
                warnings.append(w)
        index = ix + iy * nx + iz * nx * ny
        if result.images:
            first_result = first_result or result
            out = result.images[0]
            images[index] = Image.open(io.BytesIO(out.png)).convert("RGB")
            outputs[index] = out.model_copy(update={"is_grid": False})
        if result.interrupted:
            was_interrupted = True
            break

    if first_result is None:
        return GenerationResult(images=[], info={"infotexts": [], "index_of_first_image": 0},
                                warnings=list(warnings), interrupted=was_interrupted)

    # Cells not made (Interrupt) are blank, as in A1111.
    made = next(im for im in images if im is not None)
    template = next(o for o in outputs if o is not None)
    for i, im in enumerate(images):
        if im is None:
            images[i] = Image.new("RGB", made.size)
    cells: list[Image.Image] = images  # type: ignore[assignment]

    hor = [[GridAnnotation(text)] for text in plan.x.labels]
    ver = [[GridAnnotation(text)] for text in plan.y.labels]
    titles = [[GridAnnotation(text)] for text in plan.z.labels]
    sub_grids = []
    for iz in range(nz):
        part = cells[iz * nx * ny:(iz + 1) * nx * ny]
        grid = layout_grid(part, rows=ny)
        if plan.draw_legend:
            grid = draw_grid_annotations(grid, max(im.width for im in part), max(im.height for im in part),
                                         [list(t) for t in hor], [list(t) for t in ver], plan.margin_size)
        sub_grids.append(grid)
    main_grid = layout_grid(sub_grids, rows=1)
    if plan.draw_legend:
        main_grid = draw_grid_annotations(main_grid, max(g.width for g in sub_grids), max(g.height for g in sub_grids),
                                          titles, [[GridAnnotation()]])

    def cell_text(i: int) -> str:
        return outputs[i].infotext if outputs[i] is not None else template.infotext

    xy_params = {"Script": SCRIPT_TITLE, **_axis_params(plan.x, xs, plan.no_fixed_seeds),
                 **_axis_params(plan.y, ys, plan.no_fixed_seeds)}
    main_text = with_params(cell_text(0), {**xy_params, **_axis_params(plan.z, zs, plan.no_fixed_seeds)})
    sub_texts = [with_params(cell_text(iz * nx * ny), xy_params) for iz in range(nz)]

    request = job.request
    save_grids = options["grid_save"] and not getattr(request, "do_not_save_grid", False)
    grids: list[tuple[Image.Image, str, int]] = [(main_grid, main_text, 0)]
    grids += [(g, t, iz * nx * ny) for iz, (g, t) in enumerate(zip(sub_grids, sub_texts))]
    to_save = grids[:1] if not plan.include_sub_grids or nz == 1 else grids
    saved: dict[int, str] = {}
    if save_grids:
        key = "outdir_img2img_grids" if plan.is_img2img else "outdir_txt2img_grids"
        target = Path(options[key])
        folder = day_folder(target if target.is_absolute() else Path(job.outputs_root) / target,
                            options["save_to_dirs"])
        for n, (grid, text, first) in enumerate(to_save):
            source = outputs[first] or template
            path = save_image_or_warn(warnings, "grid", grid, folder, seed=source.seed, infotext=text,
                                      fmt=ImageFormat.of(options, "grid_format"), basename="xyz_grid",
                                      with_pnginfo=options["enable_pnginfo"], save_txt=options["save_txt"],
                                      **save_hooks(getattr(job, "ctx", None)))
            if path is not None:
                saved[n] = str(path)

    def grid_output(n: int, grid: Image.Image, text: str, first: int) -> GeneratedImage:
        source = outputs[first] or template
        return GeneratedImage(png=encode_png(grid, text), infotext=text, seed=source.seed, subseed=source.subseed,
                              prompt=source.prompt, negative_prompt=source.negative_prompt,
                              saved_path=saved.get(n), is_grid=True)

    answer = [grid_output(0, main_grid, main_text, 0)]
    if plan.include_sub_grids:
        answer += [grid_output(n, g, t, first) for n, (g, t, first) in enumerate(grids) if n > 0]
    if plan.include_lone_images:
        for i, im in enumerate(cells):
            answer.append(outputs[i] or GeneratedImage(png=encode_png(im, None), infotext="", seed=template.seed,
                                                        subseed=template.subseed, prompt=template.prompt,
                                                        negative_prompt=template.negative_prompt))

    made_cells = [o for o in outputs if o is not None]
    info = dict(first_result.info)
    info.update({
        "all_prompts": [o.prompt for o in made_cells], "all_negative_prompts": [o.negative_prompt for o in made_cells],
        "all_seeds": [o.seed for o in made_cells], "all_subseeds": [o.subseed for o in made_cells],
        "infotexts": [o.infotext for o in answer], "index_of_first_image": 1,
        "extra_generation_params": {**info.get("extra_generation_params", {}), **xy_params},
    })
    return GenerationResult(images=answer, info=info, warnings=list(warnings), interrupted=was_interrupted)
