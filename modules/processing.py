"""AUTOMATIC1111's `modules.processing`: the processing objects a script receives (`p`), `process_images(p)`,
`Processed`, `fix_seed`.

`p` carries the request's fields under A1111's attribute names (A1111's API builds `p` from the request the same
way: `steps`, `prompt`, `seed`, `sampler_name`, `cfg_scale`, `width`, `height`, `batch_size`, `n_iter`,
`enable_hr`, ...; img2img: `init_images` and `image_mask` as PIL pictures, `denoising_strength`, ...), plus
`extra_generation_params` (written into the infotext) and `script_args`. `process_images(p)` runs the ordinary
pipeline for `p` in the running job (the context the backend sets, `modules.context`).
"""
from __future__ import annotations

import json
import random

from modules.context import current, missing

__all__ = ["StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img", "StableDiffusionProcessingImg2Img",
           "Processed", "process_images", "fix_seed"]


class StableDiffusionProcessing:
    """The request's fields as attributes (see the module's docstring)."""

    def __init__(self, **fields):
        self.extra_generation_params: dict = {}
        self.script_args: tuple = ()
        self.override_settings: dict = {}
        self.__dict__.update(fields)
        self.extra_generation_params = dict(self.extra_generation_params or {})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "sd_model":  # the running job's model as `shared.sd_model` describes it (a script may set it)
            from modules.shared import job_model
            return job_model(f"modules.processing.{type(self).__name__}.sd_model")
        raise missing(f"modules.processing.{type(self).__name__}", name)

    def request_fields(self, names) -> dict:
        """The values of the request fields `names` as the script left them."""
        return {name: self.__dict__[name] for name in names if name in self.__dict__}


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, **fields):
        fields.setdefault("init_images", [])
        fields.setdefault("image_mask", None)
        super().__init__(**fields)


class Processed:
    """What `process_images` returns: `images` (PIL; the grid first when there is one), `infotexts` (one per image),
    `info` (the first image's infotext), `seed`, `all_seeds`, `prompt`, `all_prompts`, ..., `js()`."""

    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = list(images_list)
        self.prompt = getattr(p, "prompt", "") if p is not None else ""
        self.negative_prompt = getattr(p, "negative_prompt", "") if p is not None else ""
        self.seed = seed
        self.subseed = subseed
        self.info = info
        self.comments = comments
        self.width = getattr(p, "width", None)
        self.height = getattr(p, "height", None)
        self.steps = getattr(p, "steps", None)
        self.cfg_scale = getattr(p, "cfg_scale", None)
        self.sampler_name = getattr(p, "sampler_name", None)
        self.batch_size = getattr(p, "batch_size", 1)
        self.extra_generation_params = dict(getattr(p, "extra_generation_params", {}) or {})
        self.all_prompts = list(all_prompts or [self.prompt])
        self.all_negative_prompts = list(all_negative_prompts or [self.negative_prompt])
        self.all_seeds = list(all_seeds or [seed])
        self.all_subseeds = list(all_subseeds or [subseed])
        self.index_of_first_image = index_of_first_image
        self.infotexts = list(infotexts or [info] * len(self.images))

    def js(self) -> str:
        return json.dumps({
            "prompt": self.all_prompts[0] if self.all_prompts else self.prompt, "all_prompts": self.all_prompts,
            "negative_prompt": self.negative_prompt, "all_negative_prompts": self.all_negative_prompts,
            "seed": self.seed, "all_seeds": self.all_seeds, "subseed": self.subseed, "all_subseeds": self.all_subseeds,
            "width": self.width, "height": self.height, "sampler_name": self.sampler_name, "cfg_scale": self.cfg_scale,
            "steps": self.steps, "batch_size": self.batch_size,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.index_of_first_image, "infotexts": self.infotexts,
        })


def process_images(p) -> Processed:
    """The ordinary pipeline for `p` in the running job (one progress bar with the script's other generations)."""
    context = current("modules.processing.process_images")
    if context.process_images is None:
        raise RuntimeError("modules.processing.process_images can only be called while a job runs the script "
                           "(in run()), not while the UI is built.")
    return context.process_images(p)


def fix_seed(p) -> None:
    """A1111: a seed of -1 becomes a random one (and the variation seed too)."""
    if getattr(p, "seed", -1) in (None, "", -1):
        p.seed = int(random.randrange(4294967294))
    if getattr(p, "subseed", -1) in (None, "", -1):
        p.subseed = int(random.randrange(4294967294))


def __getattr__(name: str):
    raise missing(__name__, name)
