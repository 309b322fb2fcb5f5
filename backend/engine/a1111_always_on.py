"""The `AlwaysVisible` AUTOMATIC1111 scripts of a job (the request's `alwayson_scripts: {title: {"args": [...]}}`,
checked by the app into `ScriptCall`s), run at the points AUTOMATIC1111 1.10's `process_images` runs them, all of
them on one `p` (as A1111's ScriptRunner, `p.script_args` holding every script's arguments, `args_from`/`args_to`
each script's slice):

- when the job's scripts are prepared, before sampling: `setup(p, *args)`, then `before_process(p, *args)`, then
  (with `p.all_prompts`, `p.all_negative_prompts`, `p.all_seeds`, `p.all_subseeds` filled for every picture, a
  random seed fixed first) `process(p, *args)`. A change to the request's fields on `p` (`p.prompt`, `p.steps`,
  `p.width`, `p.sampler_name`, ...) makes the job's request (`A1111AlwaysOn.request`), checked after each script's
  call as the app checks a request (a bad value fails the job naming the script); rewritten `p.all_prompts` (and
  the other lists) give each picture its own prompt and seed (Dynamic Prompts' way). `p.extra_generation_params`
  goes into every infotext;
- for each batch, before its prompts are encoded (the `before_batch` sampling hook):
  `before_process_batch(p, *args, batch_number=, prompts=, seeds=, subseeds=)`, then `process_batch(...)` with the
  same keywords; the batch is made with the prompts they leave in `p.prompts` (or the list they were given);
- on the batch's final pictures (the `after_decode` sampling hook, before face restoration and saving):
  `postprocess_batch(p, *args, images=, batch_number=)` with the pictures as one torch tensor (B, C, H, W) in
  0..1 that the script may change in place, `postprocess_batch_list(p, pp, *args, batch_number=)` (`pp.images`
  a list of (C, H, W) tensors, replaceable), then `postprocess_image(p, pp, *args)` on each picture (`pp.image`
  replaceable);
- once the job is done: `postprocess(p, processed, *args)` with the job's `Processed`; pictures it adds to or
  removes from `processed.images` change the job's answer.

The file's `on_cfg_denoiser` callbacks run in every job, with the other extensions' (`a1111_callbacks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend.core.errors import JobInterrupted, UserError
from backend.engine.a1111_bridge import (answer_images, load_script, processed_of, processing_object, request_of,
                                         sampling_of, script_context)
from backend.engine.sampling_hooks import BatchState, SamplingHook, StepState

# p's per-picture lists (A1111's `process_images_inner` fills them before `process`) and the batch's field each
# gives (`p.prompts`, ... for the batch's methods).
_LISTS = (("all_prompts", "prompts"), ("all_negative_prompts", "negative_prompts"), ("all_seeds", "seeds"),
          ("all_subseeds", "subseeds"))


@dataclass
class _Script:
    script: Any
    args: tuple
    where: str  # "Script 'Title'"
    context: Any  # its modules.context.ScriptContext

    def overrides(self, method: str) -> bool:
        from modules.scripts import Script
        return getattr(type(self.script), method) is not getattr(Script, method)


def with_fixed_seeds(request):
    """The request with a random seed (-1) fixed, as A1111 fixes it before `process` sees `p.all_seeds`."""
    from backend.engine.rng import fix_seed

    seed, subseed = fix_seed(request.seed), fix_seed(request.subseed)
    if (seed, subseed) == (request.seed, request.subseed):
        return request
    return request.model_copy(update={"seed": seed, "subseed": subseed})


class A1111AlwaysOn(SamplingHook):
    """The job's AlwaysVisible A1111 scripts on their shared `p` (see the module's docstring)."""

    def __init__(self, calls, job, ctx):
        self.job, self.ctx = job, ctx
        self.request = with_fixed_seeds(job.request)
        self.scripts: list[_Script] = []
        script_args: list = []
        for call in calls:
            script, _file = load_script(call)
            script.args_from, script.args_to = len(script_args), len(script_args) + len(call.args)
            script_args += list(call.args)
            where = f"Script '{call.title}'"
            self.scripts.append(_Script(script, tuple(call.args), where, script_context(ctx, where)))
        init_images = [job.init_image] if job.init_image is not None else []
        self.p = processing_object(self.request, job.kind != "txt2img", init_images, job.init_mask,
                                   tuple(script_args))
        self.lists: dict[str, list] = {}  # the per-picture lists a script rewrote (`process`)
        self.batch_number = 0

    # -- calling the scripts ------------------------------------------------------------------------------------
    def _call(self, entry: _Script, method: str, *args, **kwargs):
        from modules.context import running

        try:
            with running(entry.context):
                return getattr(entry.script, method)(*args, **kwargs)
        except (UserError, JobInterrupted):
            raise
        except Exception as exc:
            raise RuntimeError(f"{entry.where} failed in {method}(): {type(exc).__name__}: {exc}") from exc

    def _each(self, method: str, *args, **kwargs) -> None:
        for entry in self.scripts:
            if entry.overrides(method):
                self._call(entry, method, self.p, *args, *entry.args, **kwargs)
                if method in ("setup", "before_process", "process"):
                    self._take_request(entry, method)

    def _each_batch(self, method: str, pp=None, **kwargs) -> None:
        """A per-batch method: A1111 passes the script's arguments before the keywords (and after `pp`)."""
        for entry in self.scripts:
            if entry.overrides(method):
                self._call(entry, method, self.p, *((pp,) if pp is not None else ()), *entry.args, **kwargs)

    def _take_request(self, entry: _Script, method: str) -> None:
        """The request's fields the script changed on `p`, checked as the app checks a request; a sampler named
        anew is resolved as the app resolves one."""
        from backend.core.sampler_catalog import sampler_fields

        where = f"{entry.where} in {method}()"
        changed = request_of(self.p, self.request, self.ctx.options, where)
        if changed is self.request:
            return
        if self.job.kind == "img2img_batch":
            raise UserError(f"{where}: an img2img folder batch keeps the request's fields; Easel's AUTOMATIC1111 "
                            "compatibility layer cannot change them for each file.", status=422)
        if sampler_fields(changed) != sampler_fields(self.request):
            self.ctx.sampling = sampling_of(changed, self.ctx.options, where)
        self.request = changed

    def _fill_lists(self) -> dict[str, list]:
        """p's per-picture lists for the request as it stands (A1111's `setup_prompts` and seeds)."""
        from backend.core.styles import styled_prompts

        req = self.request
        total = req.batch_size * req.n_iter
        # with the request's styles applied, as A1111's setup_prompts leaves them for process()
        prompt, negative = styled_prompts(req.prompt, req.negative_prompt, req.styles, self.ctx.styles)
        given = {"all_prompts": [prompt] * total, "all_negative_prompts": [negative] * total,
                 "all_seeds": [req.seed + (i if req.subseed_strength == 0 else 0) for i in range(total)],
                 "all_subseeds": [req.subseed + i for i in range(total)]}
        for name, values in given.items():
            setattr(self.p, name, list(values))
        return given

    def _rewritten_lists(self, entry: _Script, given: dict) -> None:
        """The lists `entry`'s `process` rewrote: one entry per picture (more are ignored)."""
        total = self.request.batch_size * self.request.n_iter
        for name, _field in _LISTS:
            values = getattr(self.p, name, None)
            if values is None or list(values) == given[name]:
                continue
            values = list(values)
            if len(values) < total:
                raise UserError(f"{entry.where} in process(): p.{name} has {len(values)} entries for the job's "
                                f"{total} pictures (batch size x batch count).", status=422)
            if name in ("all_seeds", "all_subseeds"):
                try:
                    values = [int(v) for v in values]
                except (TypeError, ValueError):
                    raise UserError(f"{entry.where} in process(): p.{name} must hold whole numbers.",
                                    status=422) from None
            else:
                values = [str(v) for v in values]
            self.lists[name] = values
            given[name] = values

    # -- before sampling --------------------------------------------------------------------------------------
    def prepare(self) -> list[SamplingHook]:
        p = self.p
        self._each("setup")
        self._each("before_process")
        given = self._fill_lists()
        for entry in self.scripts:
            if entry.overrides("process"):
                self._call(entry, "process", p, *entry.args)
                self._take_request(entry, "process")
                self._rewritten_lists(entry, given)
        for name, values in self.lists.items():  # what the pictures are made with
            setattr(p, name, values)
        self._extra_params()
        batch_methods = ("before_process_batch", "process_batch", "postprocess_batch", "postprocess_batch_list",
                         "postprocess_image")
        needed = self.lists or any(e.overrides(m) for e in self.scripts for m in batch_methods)
        return [self] if needed else []

    def _extra_params(self) -> None:
        self.ctx.extra_params.update({k: v for k, v in self.p.extra_generation_params.items() if v is not None})

    # -- each batch ---------------------------------------------------------------------------------------------
    def before_batch(self, batch: BatchState) -> None:
        p, n = self.p, batch.batch_number
        size = len(batch.prompts)
        for name, field in _LISTS:
            values = self.lists.get(name)
            if values is not None and len(values) >= (n + 1) * size:
                setattr(batch, field, list(values[n * size:(n + 1) * size]))
        self.batch_number = p.iteration = n
        p.prompts, p.negative_prompts = list(batch.prompts), list(batch.negative_prompts)
        p.seeds, p.subseeds = list(batch.seeds), list(batch.subseeds)  # the batch's noise is drawn from these
        for method in ("before_process_batch", "process_batch"):
            self._each_batch(method, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        for field, name in (("prompts", "prompts"), ("negative_prompts", "negative_prompts")):
            values = getattr(p, name)
            if len(values) != size:
                raise UserError(f"an always-on script changed the number of p.{name} of batch {n} ({size} -> "
                                f"{len(values)}); Easel makes each batch with its pictures' count.", status=422)
            setattr(batch, field, [str(v) for v in values])
        self._extra_params()

    def after_decode(self, state: StepState, images: list) -> list:
        from modules.scripts import PostprocessBatchListArgs, PostprocessImageArgs

        p, n = self.p, self.batch_number
        if any(e.overrides(m) for e in self.scripts for m in ("postprocess_batch", "postprocess_batch_list")):
            tensor = _tensor_of(images)
            self._each_batch("postprocess_batch", images=tensor, batch_number=n)
            pp = PostprocessBatchListArgs(list(tensor))
            self._each_batch("postprocess_batch_list", pp, batch_number=n)
            if len(pp.images) != len(images):
                raise UserError(f"an always-on script's postprocess_batch_list left {len(pp.images)} pictures in "
                                f"batch {n} of {len(images)}; Easel keeps each batch's count.", status=422)
            images = [_picture_of(x) for x in pp.images]
        if any(e.overrides("postprocess_image") for e in self.scripts):
            pictures = []
            for i, image in enumerate(images):
                p.batch_index = i
                pp = PostprocessImageArgs(image)
                self._each_batch("postprocess_image", pp)
                pictures.append(pp.image)
            images = pictures
        self._extra_params()
        return images

    # -- after the job ------------------------------------------------------------------------------------------
    def postprocess(self, result):
        """`postprocess(p, processed, *args)` with the job's Processed; the pictures it leaves are the answer's."""
        if not any(e.overrides("postprocess") for e in self.scripts):
            return result
        made: dict[int, tuple] = {}
        processed = processed_of(self.p, result, made)
        self._each_batch("postprocess", processed)
        images = answer_images(processed, made, self.request)
        info = dict(result.info, infotexts=[i.infotext for i in images])
        if not any(i.is_grid for i in images):
            info["index_of_first_image"] = 0
        return result.model_copy(update={"images": images, "info": info})


def _tensor_of(images: list):
    """PIL pictures -> one float tensor (B, C, H, W) in 0..1, as A1111's `x_samples_ddim`."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _picture_of(x):
    """A (C, H, W) tensor in 0..1 -> a PIL picture (rounded, so that an untouched picture comes back the same)."""
    import torch
    from PIL import Image

    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise UserError("an always-on script's postprocess_batch_list left a picture that is not a (C, H, W) "
                        "tensor.", status=422)
    return Image.fromarray((x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def prepare(calls, job, ctx, runtime):
    """The job's A1111 always-on scripts (`calls`: their ScriptCalls, in the request's order): run up to `process`
    here; -> (their sampling hooks, no images). `ctx.a1111_scripts` keeps them for the request they left and
    `postprocess` (the worker)."""
    scripts = A1111AlwaysOn(list(calls), job, ctx)
    hooks = scripts.prepare()
    ctx.a1111_scripts = scripts
    return hooks, []
