"""The backend side of the AUTOMATIC1111 compatibility layer (`modules/`): what a script's code reaches while a
job runs it.

- `processing_object(request, ...)`: A1111's `p` for the job's request (the request's fields under their A1111
  names, img2img's pictures as PIL);
- `request_of(p, request)`: the request for `p` as the script left it, checked like a request at the edge (a
  script's `p.steps = 10**9` is an error naming the script, never a job the engine trusts);
- `script_context(...)`: the `ScriptContext` a script's call runs in (the job's settings, flags, saving and
  `process_images`);
- `load_script(call)`: the script instance of a `ScriptCall`, loaded fresh for the job;
- `CFGDenoiserCallbacks`: a file's `on_cfg_denoiser` callbacks as a sampling hook (`backend/engine/a1111_callbacks.py`
  gives every job those of the enabled extensions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from backend.core.errors import UserError
from backend.engine.sampling_hooks import SamplingHook, StepState, UNetCall

# Request fields a script's `p` does not change the request through (images travel separately; the job's scripts
# are already chosen).
_NOT_FROM_P = ("init_images", "mask", "script_name", "script_args", "alwayson_scripts", "override_settings")


def processing_object(request, img2img: bool, init_images=None, mask=None, script_args: tuple = ()):
    from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

    fields = {k: v for k, v in request.model_dump().items() if k not in ("init_images", "mask")}
    fields["override_settings"] = dict(request.override_settings or {})
    fields["script_args"] = tuple(script_args)
    if img2img:
        return StableDiffusionProcessingImg2Img(**fields, init_images=list(init_images or []), image_mask=mask)
    return StableDiffusionProcessingTxt2Img(**fields)


def changed_fields(p, request) -> dict:
    """{field: value} of the request fields the script changed on `p`."""
    names = [n for n in type(request).model_fields if n not in _NOT_FROM_P]
    return {k: v for k, v in p.request_fields(names).items() if v != getattr(request, k)}


def request_of(p, request, options, where: str):
    """The request for `p`: the script's changes applied and checked as the app checks a request."""
    from pydantic import ValidationError

    from backend.core import limits, request_checks
    from backend.core.schemas import Img2ImgRequest

    changes = changed_fields(p, request)
    if not changes:
        return request
    try:
        changed = type(request).model_validate({**request.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(f"p.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{where}: {problems}", status=422) from None
    changed = request.model_copy(update={k: getattr(changed, k) for k in changes})
    try:
        limits.check_request(changed, options)
        (request_checks.check_img2img if isinstance(changed, Img2ImgRequest) else request_checks.check_txt2img)(changed)
    except UserError as exc:
        raise UserError(f"{where}: {exc.message}", status=exc.status) from None
    return changed


def processed_of(p, result, made: dict):
    """A1111's `Processed` of a pipeline's GenerationResult for `p`; each PIL picture is recorded in `made`
    (id(picture) -> (picture, GeneratedImage)), so that the pictures a script hands back unchanged keep their files
    (`answer_images`)."""
    from modules.processing import Processed

    from backend.engine.scripts.runner import pil_of

    pictures = []
    for image in result.images:
        picture = pil_of(image)
        made[id(picture)] = (picture, image)
        pictures.append(picture)
    info = result.info
    first = info.get("index_of_first_image", 0)
    return Processed(p, pictures, seed=info.get("seed", -1), subseed=info.get("subseed"),
                     info=result.images[first].infotext if len(result.images) > first else "",
                     all_prompts=info.get("all_prompts"), all_negative_prompts=info.get("all_negative_prompts"),
                     all_seeds=info.get("all_seeds"), all_subseeds=info.get("all_subseeds"),
                     index_of_first_image=first, infotexts=[i.infotext for i in result.images])


def answer_images(processed, made: dict, request) -> list:
    """The GeneratedImages of a script's `Processed`: the pipeline's own for the pictures it made (their saved files
    kept), the others encoded with the infotexts the script gives."""
    from backend.core.images import encode_png
    from backend.core.schemas import GeneratedImage

    images = []
    for n, picture in enumerate(processed.images):
        known = made.get(id(picture))
        infotext = processed.infotexts[n] if n < len(processed.infotexts) else processed.info
        if known is not None and known[0] is picture and known[1].infotext == infotext:
            images.append(known[1])
            continue
        seeds = processed.all_seeds or [processed.seed]
        seed = int(seeds[min(n, len(seeds) - 1)] if seeds else -1)
        is_grid = known[1].is_grid if known is not None and known[0] is picture else False
        images.append(GeneratedImage(png=encode_png(picture, infotext), infotext=infotext, seed=seed,
                                     subseed=int(processed.subseed if processed.subseed is not None else -1),
                                     prompt=processed.prompt or request.prompt,
                                     negative_prompt=processed.negative_prompt or request.negative_prompt,
                                     is_grid=is_grid))
    return images


def sampling_of(request, options, where: str):
    """The sampling of a request a script made (`request_of`), resolved as the app resolves a request's."""
    from backend.core.sampler_catalog import resolve_sampling

    try:
        return resolve_sampling(request, options["default_sampler"])
    except UserError as exc:
        raise UserError(f"{where}: {exc.message}", status=exc.status) from None


def script_context(ctx, where: str, process_images: Callable | None = None):
    """The ScriptContext of a script's call in the job `ctx` (a JobContext)."""
    from modules.context import ScriptContext

    def save_image(image, path, *, basename, seed, extension, info, forced_filename, suffix):
        from backend.core.images import ImageFormat, normalized_ext, save_image as save
        from backend.core.paths import resolve_inside

        root = Path(ctx.outputs_root)
        folder = resolve_inside(Path(path) if Path(path).is_absolute() else root / path, [root],
                                f"{where}: modules.images.save_image's folder")
        fmt = ImageFormat(normalized_ext(extension or "png"), int(ctx.options["jpeg_quality"]),
                          bool(ctx.options["webp_lossless"]))
        return save(image, folder, seed=seed, infotext=info, fmt=fmt,
                    basename=f"{basename}{suffix}" if basename or suffix else "", forced_name=forced_filename or "",
                    with_pnginfo=bool(ctx.options["enable_pnginfo"]), save_txt=bool(ctx.options["save_txt"]),
                    **({"before_save": ctx.image_save.before_save, "after_save": ctx.image_save.after_save}
                       if getattr(ctx, "image_save", None) is not None else {}))  # on_(before_)image_saved

    def model():  # the model the job runs with now (an X/Y/Z cell may have switched it)
        from backend.engine.a1111_callbacks import model_loaded_info
        return model_loaded_info(ctx.checkpoint, ctx.loaded.family)

    def selected_checkpoint():
        from modules.sd_models import CheckpointInfo
        return CheckpointInfo.of(ctx.checkpoint)

    policy = ctx.policy
    return ScriptContext(options=ctx.options, cmd_opts=None, process_images=process_images,
                         interrupted=ctx.control.interrupted, skipped=ctx.control.skipped, save_image=save_image,
                         interrupt=_stop_action(ctx.control, "interrupt"), skip=_stop_action(ctx.control, "skip"),
                         model=model, selected_checkpoint=selected_checkpoint, device=getattr(policy, "device", None),
                         dtype=getattr(policy, "dtype", None), dtype_vae=getattr(policy, "vae_dtype", None),
                         where=where)


def _stop_action(control, name: str):
    """The job control's `interrupt` / `skip` (through a script's progress wrapper), None when it has none."""
    while control is not None and not hasattr(type(control), name):
        control = getattr(control, "base", None)
    return getattr(control, name) if control is not None else None


def load_script(call) -> tuple[Any, Any]:
    """(the script instance, its ScriptFile) of a ScriptCall, the file loaded fresh for this job."""
    from modules.script_loading import load_script_file

    try:
        script_file = load_script_file(call.path)
        return script_file.instance(call.title, call.img2img), script_file
    except Exception as exc:  # noqa: BLE001  the file changed or broke since the app loaded it
        raise UserError(f"Script '{call.title}' could not be loaded from {call.path}: "
                        f"{type(exc).__name__}: {exc}", status=500) from exc


class CFGDenoiserCallbacks(SamplingHook):
    """A script file's `on_cfg_denoiser` callbacks, run at each model call before the UNet: they see A1111's
    `CFGDenoiserParams` and may change `x` (the model input) and `text_cond` (the text features)."""

    def __init__(self, callbacks: list, context, where: str = "an extension"):
        self.callbacks = list(callbacks)
        self.context = context
        self.where = where  # names the extension when a callback raises (logged and skipped, as A1111)

    def unet_inputs(self, state: StepState, call: UNetCall) -> UNetCall:
        from modules.context import running
        from modules.script_callbacks import CFGDenoiserParams

        if call.cond_mask is not None:
            rows = int(call.cond_mask.sum().item())
            text_cond, text_uncond = call.context[:rows], call.context[rows:]
        else:
            text_cond, text_uncond = call.context, None
        params = CFGDenoiserParams(x=call.sample, image_cond=None, sigma=state.sigma, sampling_step=state.step,
                                   total_sampling_steps=state.total_steps, text_cond=text_cond,
                                   text_uncond=text_uncond)
        from modules.script_callbacks import call_each
        with running(self.context):
            call_each(self.callbacks, (params,), f"on_cfg_denoiser of {self.where}")
        if params.x is call.sample and params.text_cond is text_cond and params.text_uncond is text_uncond:
            return call
        context = call.context
        if params.text_cond is not text_cond or params.text_uncond is not text_uncond:
            import torch
            context = (params.text_cond if params.text_uncond is None
                       else torch.cat([params.text_cond, params.text_uncond]))
        return call.with_changes(sample=params.x, context=context)
