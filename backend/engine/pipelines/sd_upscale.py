"""img2img's "SD upscale" script (A1111's scripts/sd_upscale.py): upscale, then redraw in overlapping tiles.

    upscale the init image by `scale_factor` with the chosen upscaler -> split it into tiles of the request's
    width x height that overlap by at least `overlap` pixels -> img2img each tile (same prompt and denoising
    strength; tiles go through in groups of batch_size, the group's seeds start one above the last group's
    first seed, and batch count n starts from seed + n, as A1111) -> blend the tiles back with linear
    feathering across each overlap -> save one image per batch count.

API: `script_name: "SD upscale"`, `script_args: [_unused, overlap, upscaler, scale_factor]`, where upscaler is
an index into GET /sdapi/v1/upscalers (A1111's `shared.sd_upscalers` order) or an upscaler's name.
The tiles are not saved; the result's infotext is the first tile's, with `SD upscale overlap` and
`SD upscale upscaler`. Progress counts the sampling steps of every tile; Interrupt stops between tiles
(the image is finished from the upscaled, unredrawn tiles).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from backend.engine import image_ops
from backend.core.errors import JobInterrupted
from backend.engine.postprocess.upscalers import target_size, upscale_for_job
from backend.postprocess.upscaler_catalog import check_output_size, upscaler_name
from backend.core.request_checks import sd_upscale_args
from backend.core.schemas import GenerationResult, Img2ImgRequest
from backend.engine.pipelines.processing import Generation
from backend.engine.pipelines.txt2img import img2img_sigmas

# -- tiles ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles lie: the image's size and each tile row's / column's start (tiles are tile_w x tile_h)."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Tile boxes, row by row (tiles may reach past an image smaller than a tile)."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]


def tile_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Evenly spread tile starts covering 0..length, neighbours sharing at least `overlap` pixels."""
    if length <= tile:
        return (0,)
    count = max(2, math.ceil((length - overlap) / (tile - overlap)))
    last = length - tile
    return tuple(round(i * last / (count - 1)) for i in range(count))


def split_tiles(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> tuple[TileGrid, list[Image.Image]]:
    """Cut `image` into overlapping tile_w x tile_h tiles (an image smaller than a tile is edge-extended)."""
    grid = TileGrid(image.width, image.height, tile_w, tile_h, tile_starts(image.width, tile_w, overlap),
                    tile_starts(image.height, tile_h, overlap))
    arr = np.asarray(image.convert("RGB"))
    pad_h, pad_w = max(0, tile_h - arr.shape[0]), max(0, tile_w - arr.shape[1])
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return grid, [Image.fromarray(arr[y0:y1, x0:x1]) for x0, y0, x1, y1 in grid.boxes]


def _feather(starts: tuple[int, ...], tile: int, length: int) -> list[np.ndarray]:
    """Per-tile weights along one axis: linear ramps across each overlap, normalised to sum to 1 everywhere."""
    pos = np.arange(tile, dtype=np.float32) + 0.5
    weights = []
    for i, s in enumerate(starts):
        w = np.ones(tile, dtype=np.float32)
        if i > 0 and starts[i - 1] + tile > s:
            w = np.minimum(w, pos / (starts[i - 1] + tile - s))
        if i + 1 < len(starts) and s + tile > starts[i + 1]:
            w = np.minimum(w, (tile - pos) / (s + tile - starts[i + 1]))
        weights.append(w)
    total = np.zeros(max(length, tile), dtype=np.float32)
    for s, w in zip(starts, weights):
        total[s:s + tile] += w
    return [w / total[s:s + tile] for s, w in zip(starts, weights)]


def combine_tiles(grid: TileGrid, tiles: list[Image.Image]) -> Image.Image:
    """Blend the (processed) tiles of `split_tiles` back into one image of the grid's size."""
    wx = _feather(grid.xs, grid.tile_w, grid.width)
    wy = _feather(grid.ys, grid.tile_h, grid.height)
    out = np.zeros((max(grid.height, grid.tile_h), max(grid.width, grid.tile_w), 3), dtype=np.float32)
    k = 0
    for r, y in enumerate(grid.ys):
        for c, x in enumerate(grid.xs):
            tile = tiles[k].convert("RGB")
            if tile.size != (grid.tile_w, grid.tile_h):
                tile = tile.resize((grid.tile_w, grid.tile_h), Image.Resampling.LANCZOS)
            weight = wy[r][:, None, None] * wx[c][None, :, None]
            out[y:y + grid.tile_h, x:x + grid.tile_w] += np.asarray(tile, dtype=np.float32) * weight
            k += 1
    out = out[:grid.height, :grid.width]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# -- the job ----------------------------------------------------------------------------------------------
class _TileControl:
    """The job's control as seen by one tile group's img2img run: the upscale began the step count for all tiles,
    and the group's batch number is its place among all groups."""

    def __init__(self, control, job_no: int):
        self._control, self._job_no = control, job_no

    def __getattr__(self, name):
        return getattr(self._control, name)

    def begin(self, job_count: int, total_steps: int) -> None:
        pass

    def set_job(self, job_no: int) -> None:
        self._control.set_job(self._job_no + job_no)


def run(req: Img2ImgRequest, ctx, init_images: list[Image.Image], mask: Image.Image | None,
        samples_dir=None) -> GenerationResult:
    from backend.engine.pipelines import img2img  # img2img dispatches here: imported when running

    args = sd_upscale_args(req)  # checked by the app, as is the absence of a mask (`request_checks.check_img2img_inputs`)
    name = upscaler_name(args.upscaler, ctx.postprocess.upscalers() if ctx.postprocess is not None else None)
    source = image_ops.flatten(init_images[0])
    width, height = target_size(source.width, source.height, args.scale)
    check_output_size(width, height, "The SD upscaled image")

    # One image per batch count; batch_size is how many tiles go through together. The tiles are not saved.
    job_req = req.model_copy(update={"batch_size": 1, "do_not_save_grid": True})
    gen = Generation(job_req, ctx, samples_dir_key="outdir_img2img_samples", grids_dir_key="outdir_img2img_grids",
                     samples_dir=samples_dir)
    ctx.extra_params["SD upscale overlap"] = args.overlap
    ctx.extra_params["SD upscale upscaler"] = name

    try:
        upscaled = upscale_for_job(ctx, source, name, width, height)
    except JobInterrupted:  # Interrupt between the upscaler's tiles: nothing was redrawn yet
        gen.interrupted = True
        return gen.finish({"denoising_strength": float(req.denoising_strength)})
    grid, tiles = split_tiles(upscaled, req.width, req.height, args.overlap)
    group = max(1, req.batch_size)
    groups = [tiles[i:i + group] for i in range(0, len(tiles), group)]
    denoise = float(req.denoising_strength)
    sigmas = img2img_sigmas(gen.sampler_info, gen.schedule, gen.model_schedule, req.steps, denoise,
                            bool(ctx.options["img2img_fix_steps"]))
    steps = len(sigmas) - 1 if denoise > 0 else 0
    ctx.control.begin(req.n_iter * len(groups), req.n_iter * len(groups) * steps)

    tile_req = req.model_copy(update={"script_name": None, "script_args": [], "n_iter": 1, "do_not_save_samples": True,
                                      "do_not_save_grid": True, "subseed": gen.subseed})
    for n in range(req.n_iter):
        done: list[Image.Image] = []
        infotext, stopped = None, False
        for i, batch in enumerate(groups):
            if ctx.control.interrupted():
                stopped = True
                break
            part = tile_req.model_copy(update={"seed": gen.seed + n + i, "batch_size": len(batch)})
            part_ctx = replace(ctx, control=_TileControl(ctx.control, n * len(groups) + i))
            result = img2img.run(part, part_ctx, batch, None)
            produced = [o for o in result.images if not o.is_grid]
            infotext = infotext or (produced[0].infotext if produced else None)
            done.extend(Image.open(io.BytesIO(o.png)).convert("RGB") for o in produced)
            if result.interrupted:
                stopped = True
                break
        if done:
            combined = combine_tiles(grid, done + tiles[len(done):])
            gen.add_image(combined, n, infotext=infotext)
        if stopped:
            gen.interrupted = True
            break

    return gen.finish({"denoising_strength": denoise})
