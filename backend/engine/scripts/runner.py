"""`ScriptRun`: one selectable script's job in the backend process.

It gives the script `generate(request, ...)` (the ordinary pipeline for a changed request, in this process), one
progress bar over all its generations (`plan`), and the pieces of A1111's answer: a grid saved to `*-grids/` with
the infotext of the first image, and the job's `GenerationResult` (grid first, then the images, `infotexts` for
each).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from PIL import Image

from backend.core.images import ImageFormat, day_folder, encode_png, save_image_or_warn
from backend.engine.a1111_callbacks import save_hooks  # the extensions' on_(before_)image_saved
from backend.core.sampler_catalog import sampler_fields
from backend.core.schemas import GeneratedImage, GenerationResult


_SAME = object()  # generate(): the job's own mask


class ScriptStopped(Exception):
    """Interrupt was pressed: the script stops; the job answers with the images made so far."""


class ScriptProgress:
    """The JobControl the pipelines see during a script: their batches continue one progress bar that the script
    planned (`plan`), instead of each generation starting its own."""

    def __init__(self, base):
        self.base = base
        self.planned = False
        self.offset = 0  # batches of the generations before the current one
        self.current = 0  # batches of the current generation
        self.skips = 0  # batches the user skipped (the pipelines clear Skip after a skipped batch)

    def plan(self, job_count: int, total_steps: int) -> None:
        self.planned = True
        self.base.begin(max(1, job_count), total_steps)

    def begin(self, job_count: int, total_steps: int) -> None:
        self.current = job_count
        if not self.planned:
            self.base.begin(job_count, total_steps)

    def set_job(self, job_no: int) -> None:
        self.base.set_job(self.offset + job_no)

    def next_generation(self) -> None:
        self.offset += self.current
        self.current = 0

    def step(self, preview) -> None:
        self.base.step(preview)

    def interrupted(self) -> bool:
        return self.base.interrupted()

    def skipped(self) -> bool:
        return self.base.skipped()

    def clear_skip(self) -> None:
        self.skips += 1
        self.base.clear_skip()


def pil_of(image: GeneratedImage) -> Image.Image:
    picture = Image.open(io.BytesIO(image.png))
    picture.load()
    return picture


class ScriptRun:
    def __init__(self, kind: str, payload: dict, ctx, run_pipeline: Callable[[dict], GenerationResult]):
        self.kind = kind
        self.payload = payload
        self.ctx = ctx
        self.request = payload["request"]
        self.init_images = list(payload.get("init_images") or [])
        self.mask = payload.get("mask")
        self._run_pipeline = run_pipeline
        self.progress = ScriptProgress(ctx.control)
        self.results: list[GenerationResult] = []
        self.skipped_last = False  # the last generation had a batch skipped (Skip)

    @property
    def img2img(self) -> bool:
        return self.kind == "img2img"

    @property
    def options(self):
        """The job's settings (`JobOptions`)."""
        return self.ctx.options

    @property
    def outputs_root(self) -> Path:
        return Path(self.ctx.outputs_root)

    @property
    def warnings(self) -> list[str]:
        return self.ctx.warnings

    def interrupted(self) -> bool:
        return self.ctx.control.interrupted()

    def plan(self, job_count: int, total_steps: int) -> None:
        """One progress bar for the whole script: `job_count` batches, `total_steps` sampler steps."""
        self.progress.plan(job_count, total_steps)

    def steps_of(self, request) -> int:
        """Sampler steps one batch of `request` runs (hires. fix included; img2img: the denoised share)."""
        if self.img2img:
            denoise = float(request.denoising_strength or 0)
            if self.ctx.options["img2img_fix_steps"]:
                return request.steps if denoise > 0 else 0
            return int(min(denoise, 0.999) * request.steps)
        return request.steps + ((request.hr_second_pass_steps or request.steps) if request.enable_hr else 0)

    @property
    def always_on_variants(self) -> dict:
        """The always-on scripts some generations run with instead of the job's, parsed by the app by key
        (`PreparedScript.always_on`: X/Y/Z plot's "[ControlNet] Weight" cells); give them to `generate(scripts=)`."""
        return self.payload.get("script", {}).get("always_on") or {}

    def generate(self, request, init_images: list[Image.Image] | None = None, extra_params: dict | None = None,
                 mask: Image.Image | None | object = _SAME, scripts: dict | object = _SAME,
                 color_from: list[Image.Image] | None = None, each=None) -> GenerationResult:
        """The pipeline for `request` (and, in img2img, `init_images` and `mask`, by default the job's), its
        infotexts with `extra_params` added; `scripts`: the always-on scripts it runs with (one of
        `always_on_variants`), by default the job's; img2img with the setting `img2img_color_correction`:
        `color_from`, the pictures the outputs take their colours from instead of their inputs; `each`
        (`EachImage`): the prompts and seeds of each image instead of the request's."""
        if self.ctx.control.interrupted():
            raise ScriptStopped
        payload = dict(self.payload, request=request)
        payload.pop("script", None)
        if init_images is not None:
            payload["init_images"] = init_images
        if mask is not _SAME:
            payload["mask"] = mask
        if scripts is not _SAME:
            payload["scripts"] = scripts
        if color_from is not None:
            payload["color_correction_from"] = color_from
        if each is not None:
            payload["each_image"] = each
        added = {k: v for k, v in (extra_params or {}).items() if k not in self.ctx.extra_params}
        self.ctx.extra_params.update(added)
        control, sampling = self.ctx.control, self.ctx.sampling
        self.ctx.control = self.progress
        skips = self.progress.skips
        key = sampler_fields(request)
        if key != sampler_fields(self.request):  # a line's --sampler_name, an X/Y/Z Sampler axis
            # resolved by the app with the script's other derived requests (`payload["script"]["sampling"]`)
            self.ctx.sampling = payload["sampling"] = self.payload["script"]["sampling"][key]
        try:
            result = self._run_pipeline(payload)
        finally:
            self.ctx.control, self.ctx.sampling = control, sampling
            for key in added:
                self.ctx.extra_params.pop(key, None)
        self.progress.next_generation()
        self.skipped_last = self.progress.skips > skips
        self.results.append(result)
        if result.interrupted and control.interrupted():
            raise ScriptStopped
        return result

    def _folder(self, key: str) -> Path:
        folder = Path(self.ctx.options[key])
        folder = folder if folder.is_absolute() else Path(self.ctx.outputs_root) / folder
        return day_folder(folder, self.ctx.options["save_to_dirs"])

    def sample(self, picture: Image.Image, infotext: str, seed: int) -> GeneratedImage:
        """A picture the script composed itself (Outpainting mk2's grown picture): saved as the job's sample
        (settings `samples_save`, unless the request says not to) with `infotext`, and returned for the answer."""
        options, req = self.ctx.options, self.request
        path = None
        if options["samples_save"] and not req.do_not_save_samples:
            path = save_image_or_warn(self.ctx.warnings, "image", picture,
                                      self._folder("outdir_img2img_samples" if self.img2img else "outdir_txt2img_samples"),
                                      seed=seed, infotext=infotext, fmt=ImageFormat.of(options),
                                      with_pnginfo=options["enable_pnginfo"], save_txt=options["save_txt"],
                                      **save_hooks(self.ctx))
        made = [i for r in self.results for i in r.images if not i.is_grid]
        return GeneratedImage(png=encode_png(picture, infotext), infotext=infotext, seed=seed,
                              subseed=made[0].subseed if made else -1, prompt=req.prompt,
                              negative_prompt=req.negative_prompt, saved_path=str(path) if path else None)

    def grid(self, picture: Image.Image, first: GeneratedImage, basename: str = "grid") -> GeneratedImage | None:
        """The script's grid, saved to the tab's grids folder (setting `grid_save`, unless the request says not to
        save grids) with the infotext of the first image; returned for the answer when `return_grid` is on."""
        options, req = self.ctx.options, self.request
        path = None
        if options["grid_save"] and not req.do_not_save_grid:
            path = save_image_or_warn(self.ctx.warnings, "grid", picture,
                                      self._folder("outdir_img2img_grids" if self.img2img else "outdir_txt2img_grids"),
                                      seed=first.seed,
                                      infotext=first.infotext, fmt=ImageFormat.of(options, "grid_format"),
                                      basename=basename, with_pnginfo=options["enable_pnginfo"],
                                      save_txt=options["save_txt"], **save_hooks(self.ctx))
        if not options["return_grid"]:
            return None
        return GeneratedImage(png=encode_png(picture, first.infotext), infotext=first.infotext, seed=first.seed,
                              subseed=first.subseed, prompt=first.prompt, negative_prompt=first.negative_prompt,
                              saved_path=str(path) if path else None, is_grid=True)

    def answer(self, images: list[GeneratedImage], info_update: dict | None = None,
               interrupted: bool = False) -> GenerationResult:
        """The job's result in A1111's shape: `images` (a grid first, when there is one), `info` of the first
        generation with every image's prompt, seed and infotext."""
        base = self.results[0].info if self.results else {}
        produced = [i for i in images if not i.is_grid]
        info = dict(base)
        info.update({
            "all_prompts": [i.prompt for i in produced], "all_negative_prompts": [i.negative_prompt for i in produced],
            "all_seeds": [i.seed for i in produced], "all_subseeds": [i.subseed for i in produced],
            "infotexts": [i.infotext for i in images],
            "index_of_first_image": 1 if images and images[0].is_grid else 0,
        })
        if produced:
            info["seed"], info["subseed"] = produced[0].seed, produced[0].subseed
        info.update(info_update or {})
        warnings = list(dict.fromkeys(self.ctx.warnings))
        stopped = interrupted or any(r.interrupted for r in self.results)
        return GenerationResult(images=images, info=info, warnings=warnings, interrupted=stopped)

    def run(self, name: str, script: Callable, args) -> GenerationResult:
        import torch

        from backend.core.errors import UserError

        try:
            return script(args, self, self.generate)
        except ScriptStopped:  # Interrupt: the images made so far are the answer
            made = [image for result in self.results for image in result.images if not image.is_grid]
            return self.answer(made, interrupted=True)
        except UserError as exc:
            raise UserError(f"Script '{name}': {exc.message}", status=exc.status) from exc
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the worker steps the device policy down and runs the job again
        except Exception as exc:  # a bug in the script: the job fails naming it (the worker logs the traceback)
            raise RuntimeError(f"Script '{name}' failed: {type(exc).__name__}: {exc}") from exc

