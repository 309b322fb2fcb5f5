"""What every generation job (txt2img, img2img) shares around its sampling loop.

`Generation` takes the sampler resolved by the app (`JobContext.sampling`), sets
up seeds, prompts and the text conditioner from a request, keeps the infotext
parameters, saves each finished image (with its infotext) as A1111 does, and
assembles the grid and the `info` of the result.
The pipelines only add their own sampling between `begin` and `finish`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from backend.engine import schedules
from backend.engine.conditioning import TextConditioner
from backend.core.images import ImageFormat, day_folder, encode_png, image_grid, save_image_or_warn
from backend.core.infotext import module_params
from backend.engine.rng import fix_seed
from backend.engine.token_merging import ratio_for_pass
from backend.core.styles import styled_prompts
from backend.core.schemas import GeneratedImage, GenerationResult, Txt2ImgRequest
from backend.engine.pipelines.common import (VERSION, JobContext, flow_guidance, format_number, sampler_extra_args,
                                             sampler_params, uncond_skips)


@dataclass(frozen=True)
class EachImage:
    """A script's prompt, negative prompt, seed and variation seed for each image of a generation, instead of the
    request's (A1111's `p.prompt`, `p.seed`, ... given as lists: Prompt matrix batches its combinations). One entry
    per image: batch size x batch count."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]


class Generation:
    def __init__(self, req: Txt2ImgRequest, ctx: JobContext, *, samples_dir_key: str, grids_dir_key: str,
                 samples_dir: Path | None = None, each: EachImage | None = None):
        if ctx.sampling is None:
            raise ValueError("JobContext.sampling is not set: resolve the request's sampler with "
                             "backend.core.sampler_catalog.resolve_sampling (the app does it for every job)")
        self.req, self.ctx = req, ctx
        model, options = ctx.model, ctx.options
        self.device = ctx.policy.device
        self.sampler_info, self.schedule = ctx.sampling.sampler, ctx.sampling.schedule
        self.clip_skip = int(options["CLIP_stop_at_last_layers"])  # the job's override is merged in, checked
        self.model_schedule = schedules.model_schedule(model)
        self.extra = sampler_extra_args(self.sampler_info, req, options)
        self.uncond_skips = uncond_skips(req, options)  # NGMS / skip early CFG: the denoisers of every pass

        self.total_images = req.batch_size * req.n_iter
        self.seed = fix_seed(req.seed)
        self.subseed = fix_seed(req.subseed)
        self.all_seeds = [self.seed + (i if req.subseed_strength == 0 else 0) for i in range(self.total_images)]
        self.all_subseeds = [self.subseed + i for i in range(self.total_images)]
        # the request's styles go into its prompts (hires. prompts too), and so into the infotext, as A1111's
        prompt, negative = styled_prompts(req.prompt, req.negative_prompt, req.styles, ctx.styles)
        self.prompts = [prompt] * self.total_images
        self.negatives = [negative] * self.total_images
        hr_prompt, hr_negative = getattr(req, "hr_prompt", ""), getattr(req, "hr_negative_prompt", "")
        self.hr_prompt, self.hr_negative = styled_prompts(hr_prompt, hr_negative, req.styles, ctx.styles)
        self.hr_prompt, self.hr_negative = self.hr_prompt if hr_prompt else "", self.hr_negative if hr_negative else ""
        if each is not None:
            if not (len(each.prompts) == len(each.negative_prompts) == len(each.seeds) == len(each.subseeds)
                    == self.total_images):
                raise ValueError(f"EachImage: {self.total_images} entries needed (batch size x batch count)")
            styled = [styled_prompts(p, n, req.styles, ctx.styles) for p, n in zip(each.prompts, each.negative_prompts)]
            self.prompts, self.negatives = [p for p, _ in styled], [n for _, n in styled]
            self.all_seeds, self.all_subseeds = list(each.seeds), list(each.subseeds)
            self.seed, self.subseed = self.all_seeds[0], self.all_subseeds[0]

        self.conditioner = self._conditioner(model)
        # per model the job samples with (a weak reference: an evicted model is not kept alive)
        self._per_model = {id(model): (weakref.ref(model), self.conditioner, self.model_schedule)}
        self.tiled = None  # the pipeline's `tiling(...)` set, when it tiles
        self.preview_every = int(options["show_progress_every_n_steps"]) if options["live_previews_enable"] else -1
        # token merging ratios of the first and the hires. fix pass (A1111's choice of setting)
        overridden = tuple((getattr(req, "override_settings", None) or {}).keys())
        self.token_merging = ratio_for_pass(options, img2img=hasattr(req, "init_images"), overridden=overridden)
        self.token_merging_hr = ratio_for_pass(options, hires=True)

        self.params: dict[str, object] = {
            "Steps": req.steps, "Sampler": self.sampler_info.name, "Schedule type": self.schedule,
            "CFG scale": format_number(req.cfg_scale),
            # Forge's entry for a model with a distilled guidance input (FLUX dev)
            "Distilled CFG Scale": (format_number(flow_guidance(req)["distilled_cfg_scale"])
                                    if getattr(model, "guidance_embeds", False) else None),
            "Size": f"{req.width}x{req.height}",
            "Model hash": ctx.checkpoint.shorthash if options["add_model_hash_to_info"] else None,
            "Model": ctx.checkpoint.model_name if options["add_model_name_to_info"] else None,
            "VAE hash": ctx.vae.shorthash if ctx.vae else None, "VAE": ctx.vae.model_name if ctx.vae else None,
            **module_params(getattr(model, "modules", ())),  # FLUX.1 / SD3: "Module 1: ae", as Forge
            "Variation seed strength": format_number(req.subseed_strength) if req.subseed_strength > 0 else None,
            "Seed resize from": (f"{req.seed_resize_from_w}x{req.seed_resize_from_h}"
                                 if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0 else None),
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None,
            "Tiling": True if req.tiling else None,
            "Token merging ratio": format_number(self.token_merging) if self.token_merging else None,
            "Emphasis": self._emphasis_param(options["emphasis"]),
            **self.uncond_skips.infotext(),
            **self._flow_params(model, options),
            **sampler_params(self.sampler_info, self.extra, options),
        }

        self.save_samples = not req.do_not_save_samples and options["samples_save"]
        self.out_dir = samples_dir or day_folder(self.outdir(samples_dir_key), options["save_to_dirs"])
        self.grids_dir_key = grids_dir_key
        self.fmt = ImageFormat.of(options)  # samples_format, jpeg_quality, webp_lossless
        self.grid_fmt = ImageFormat.of(options, "grid_format")
        self.save_txt = bool(options["save_txt"])
        self.pattern = options["samples_filename_pattern"]
        self.outputs: list[GeneratedImage] = []
        self.pil_images: list[Image.Image] = []
        self.interrupted = False

    def _emphasis_param(self, emphasis: str) -> str | None:
        """A1111 names the emphasis mode in the infotext when it is not Original and a prompt has brackets."""
        texts = self.prompts + self.negatives + [self.hr_prompt, self.hr_negative]
        if emphasis == "Original" or not any("(" in t or "[" in t for t in texts):
            return None
        return emphasis

    @staticmethod
    def _flow_params(model, options) -> dict[str, object]:
        """SD3's skip-layer guidance in the infotext when it is on (`SLG scale`, ...)."""
        if getattr(model, "family", None) != "sd3":
            return {}
        from backend.engine.families.flow_sampling import infotext_entries, skip_layer_guidance
        return infotext_entries(skip_layer_guidance(options))

    def _conditioner(self, model):
        """The text conditioner of `model`: `TextConditioner` for SD 1.x/2.x/SDXL, the flow families' own
        (`backend.engine.families.flow_conditioning.FlowConditioner`: CLIP and T5) for FLUX and SD3."""
        ctx, options = self.ctx, self.ctx.options
        if getattr(model, "prediction_type", None) == "flow":
            from backend.engine.families.flow_conditioning import FlowConditioner
            encoder_devices = getattr(ctx.policy, "encoder_devices", None)  # T5-XXL kept on the CPU by the policy
            return FlowConditioner(model, self.device, embeddings=getattr(ctx, "embeddings", None),
                                   should_stop=ctx.control.interrupted, emphasis=options["emphasis"],
                                   max_chunks=int(options["prompt_max_chunks"]),
                                   encoder_devices=encoder_devices(ctx.loaded) if encoder_devices else None)
        return TextConditioner(model, self.device, self.clip_skip, embeddings=getattr(ctx, "embeddings", None),
                               max_chunks=int(options["prompt_max_chunks"]), should_stop=ctx.control.interrupted,
                               emphasis=options["emphasis"])

    def for_model(self):
        """(text conditioner, noise schedule) of the model the job samples with now (`ctx.model`): the job's own, or
        the refiner's / hires. checkpoint's after a switch (`ctx.switch_model`), each made once."""
        model = self.ctx.model
        if self.tiled is not None:  # a job with Tiling tiles the refiner / hires. checkpoint too
            self.tiled.add(model)
        known = self._per_model.get(id(model))
        if known is None or known[0]() is not model:
            conditioner = self._conditioner(model)
            schedule = schedules.model_schedule(model)
            self._per_model[id(model)] = (weakref.ref(model), conditioner, schedule)
        return self._per_model[id(model)][1:]

    def batches(self):
        """Yield (batch number, slice of the job's images) for each batch, until Interrupt."""
        size = self.req.batch_size
        for n in range(self.req.n_iter):
            if self.ctx.control.interrupted():
                self.interrupted = True
                return
            self.ctx.control.set_job(n)
            idx = slice(n * size, (n + 1) * size)
            self._before_batch(n, idx)
            yield n, idx

    def _before_batch(self, n: int, idx: slice) -> None:
        """The sampling hooks' `before_batch` (an AUTOMATIC1111 script's `process_batch`): what they leave in the
        batch's prompts and seeds is what the batch is made with."""
        from backend.engine.sampling_hooks import BatchState, run_before_batch

        lists = (self.prompts, self.negatives, self.all_seeds, self.all_subseeds)
        batch = BatchState(n, *(list(values[idx]) for values in lists))
        if not run_before_batch(self.ctx.sampling_hooks, batch):
            return
        changed = (batch.prompts, batch.negative_prompts, batch.seeds, batch.subseeds)
        for values, new in zip(lists, changed):
            if len(new) != len(values[idx]):
                raise ValueError(f"batch {n}: a script changed the number of prompts or seeds of the batch "
                                 f"({len(values[idx])} -> {len(new)})")
            values[idx] = list(new)

    def end_batch(self, stop: str | None) -> bool:
        """After a batch's images are added: True when the job must stop (Interrupt); Skip moves on."""
        if stop == "interrupted":
            self.interrupted = True
            return True
        if stop == "skipped":
            self.ctx.control.clear_skip()
        return False

    def outdir(self, key: str) -> Path:
        target = Path(self.ctx.options[key])
        return target if target.is_absolute() else Path(self.ctx.outputs_root) / target

    def infotext(self, i: int) -> str:
        from backend.core.infotext import build_infotext

        params = dict(self.params)
        params.update(self.ctx.extra_params)
        params["Seed"] = self.all_seeds[i]
        params["Variation seed"] = self.all_subseeds[i] if self.req.subseed_strength > 0 else None
        params["Version"] = VERSION if self.ctx.options["add_version_to_infotext"] else None
        return build_infotext(self.prompts[i], self.negatives[i], params)

    def name_values(self, seed: int) -> dict:
        req, ctx = self.req, self.ctx
        return {"seed": seed, "prompt": self.prompts[0], "prompt_no_styles": req.prompt, "steps": req.steps, "cfg": format_number(req.cfg_scale),
                "sampler": self.sampler_info.name, "width": req.width, "height": req.height,
                "model_name": ctx.checkpoint.model_name, "model_hash": ctx.checkpoint.shorthash}

    def save_callbacks(self) -> dict:
        """`save_image`'s before_save / after_save: the extensions' on_before_image_saved / on_image_saved."""
        from backend.engine.a1111_callbacks import save_hooks
        return save_hooks(self.ctx)

    def add_image(self, img: Image.Image, i: int, basename: str | None = None, infotext: str | None = None) -> None:
        """Record (and, unless told not to, save) image i of the job with its infotext (`infotext`: one made elsewhere,
        as SD upscale takes its first tile's)."""
        text = infotext or self.infotext(i)
        path = None
        if self.save_samples:
            # a folder that cannot be written costs the file, never the image: the job returns it with a warning
            path = save_image_or_warn(self.ctx.warnings, "image", img, self.out_dir, seed=self.all_seeds[i],
                                      infotext=text, fmt=self.fmt, pattern=self.pattern,
                                      name_values=self.name_values(self.all_seeds[i]),
                                      with_pnginfo=self.ctx.options["enable_pnginfo"], basename=basename or "",
                                      save_txt=self.save_txt, **self.save_callbacks())
        self.outputs.append(GeneratedImage(png=encode_png(img, text), infotext=text, seed=self.all_seeds[i],
                                           subseed=self.all_subseeds[i], prompt=self.prompts[i],
                                           negative_prompt=self.negatives[i], saved_path=str(path) if path else None))
        self.pil_images.append(img)

    def finish(self, info_extra: dict | None = None) -> GenerationResult:
        req, ctx, options = self.req, self.ctx, self.ctx.options
        if (len(self.pil_images) > 1 and not req.do_not_save_grid
                and (options["return_grid"] or options["grid_save"])):
            grid = image_grid(self.pil_images)
            text = self.infotext(0)
            path = None
            if options["grid_save"]:
                grid_dir = day_folder(self.outdir(self.grids_dir_key), options["save_to_dirs"])
                path = save_image_or_warn(ctx.warnings, "grid", grid, grid_dir, seed=self.all_seeds[0], infotext=text,
                                          fmt=self.grid_fmt, basename="grid", with_pnginfo=options["enable_pnginfo"],
                                          save_txt=self.save_txt, **self.save_callbacks())
            if options["return_grid"]:
                self.outputs.insert(0, GeneratedImage(png=encode_png(grid, text), infotext=text, seed=self.all_seeds[0],
                                                      subseed=self.all_subseeds[0], prompt=self.prompts[0],
                                                      negative_prompt=self.negatives[0],
                                                      saved_path=str(path) if path else None, is_grid=True))

        produced = [o for o in self.outputs if not o.is_grid]
        info = {
            "prompt": req.prompt, "all_prompts": [o.prompt for o in produced],
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [o.negative_prompt for o in produced],
            "seed": self.seed, "all_seeds": [o.seed for o in produced], "subseed": self.subseed,
            "all_subseeds": [o.subseed for o in produced], "subseed_strength": req.subseed_strength,
            "width": req.width, "height": req.height, "sampler_name": self.sampler_info.name, "scheduler": self.schedule,
            "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size,
            "restore_faces": bool(req.restore_faces),
            "sd_model_name": ctx.checkpoint.model_name, "sd_model_hash": ctx.checkpoint.shorthash,
            "sd_model_checkpoint": ctx.checkpoint.title,  # the checkpoint's /sdapi/v1/sd-models title
            "sd_vae_name": ctx.vae.model_name if ctx.vae else None, "sd_vae_hash": ctx.vae.shorthash if ctx.vae else None,
            "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": req.denoising_strength,
            "extra_generation_params": {k: v for k, v in ctx.extra_params.items() if v is not None},
            "index_of_first_image": 1 if self.outputs and self.outputs[0].is_grid else 0,
            "infotexts": [o.infotext for o in self.outputs], "styles": req.styles, "job_timestamp": "",
            "clip_skip": self.clip_skip, "is_using_inpainting_conditioning": bool(ctx.model.is_inpaint),
            "version": VERSION,
        }
        info.update(info_extra or {})
        return GenerationResult(images=self.outputs, info=info, warnings=list(ctx.warnings), interrupted=self.interrupted)
