"""An `AlwaysVisible` AUTOMATIC1111 script from an extension, as an always-on script of the job (the request's
`alwayson_scripts: {title: {"args": [...]}}`, checked by the app into a `ScriptCall`):

- `before_process(p, *args)` and `process(p, *args)` run when the job's scripts are prepared; what they put in
  `p.extra_generation_params` goes into every infotext of the job. Changes to the request's own fields on `p`
  (steps, prompt, ...) are refused with an error naming them: Easel does not carry them into the job yet;
- `postprocess_image(p, pp, *args)` runs on each final picture (the `after_decode` sampling hook: before face
  restoration and saving); the picture it leaves in `pp.image` is the job's;
- the file's `on_cfg_denoiser` callbacks run in every job, with the other extensions' (`a1111_callbacks`).
"""
from __future__ import annotations

from backend.core.errors import UserError
from backend.engine.a1111_bridge import changed_fields, load_script, processing_object, script_context
from backend.engine.sampling_hooks import SamplingHook, StepState


class PostprocessImage(SamplingHook):
    """The script's `postprocess_image` on each final picture."""

    def __init__(self, script, p, args: tuple, context):
        self.script, self.p, self.args, self.context = script, p, args, context

    def after_decode(self, state: StepState, images: list) -> list:
        from modules.context import running
        from modules.scripts import PostprocessImageArgs

        pictures = []
        with running(self.context):
            for image in images:
                pp = PostprocessImageArgs(image)
                self.script.postprocess_image(self.p, pp, *self.args)
                pictures.append(pp.image)
        return pictures


def prepare(call, job, ctx, runtime):
    from modules.context import running
    from modules.scripts import Script

    script, _script_file = load_script(call)
    where = f"Script '{call.title}'"
    context = script_context(ctx, where)
    init_images = [job.init_image] if job.init_image is not None else []
    p = processing_object(job.request, call.img2img, init_images, job.init_mask, call.args)
    try:
        with running(context):
            script.before_process(p, *call.args)
            script.process(p, *call.args)
    except UserError:
        raise
    except Exception as exc:
        raise RuntimeError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    changed = changed_fields(p, job.request)
    if changed:
        raise UserError(f"{where}: process() changed {', '.join('p.' + k for k in changed)}; Easel's AUTOMATIC1111 "
                        "compatibility layer does not carry an always-on script's changes to the request yet.",
                        status=500)
    ctx.extra_params.update({k: v for k, v in p.extra_generation_params.items() if v is not None})
    hooks: list[SamplingHook] = []
    if type(script).postprocess_image is not Script.postprocess_image:
        hooks.append(PostprocessImage(script, p, call.args, context))
    return hooks, []
