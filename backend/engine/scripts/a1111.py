"""A selectable AUTOMATIC1111 script from an extension (`Script.run(p, *args)`), run in the job through the
compatibility layer (`modules/`): the script gets A1111's `p` for the job's request, and its
`modules.processing.process_images(p)` runs the ordinary pipeline here (`generate`: one progress bar, Interrupt
stops the script), with `p.extra_generation_params` in the infotexts. What `run` returns (`Processed`, or None:
A1111 then processes `p` itself) is the job's answer; pictures the script made itself are encoded with the
infotexts it gives. The file's `on_cfg_denoiser` callbacks run in every job (`backend/engine/a1111_callbacks.py`).
"""
from __future__ import annotations

from backend.engine.a1111_bridge import (answer_images, load_script, processed_of, processing_object, request_of,
                                         script_context)


def run(call, job, generate):
    from modules.context import running
    from modules.processing import Processed

    script, _script_file = load_script(call)
    where = f"Script '{call.title}'"
    made: dict[int, tuple] = {}  # id(PIL picture) -> (picture, GeneratedImage): pictures the pipeline made

    def process_images(p) -> Processed:
        request = request_of(p, job.request, job.options, "process_images(p)")
        planned = context.state.job_count
        if planned > 1 and not job.progress.planned:  # A1111 scripts announce their generations in state.job_count
            job.plan(planned, planned * job.steps_of(request))
        images = {"init_images": list(p.init_images), "mask": p.image_mask} if job.img2img else {}
        result = generate(request, extra_params=dict(p.extra_generation_params), **images)
        return processed_of(p, result, made)

    context = script_context(job.ctx, where, process_images)
    p = processing_object(job.request, job.img2img, job.init_images, job.mask, call.args)
    with running(context):
        processed = script.run(p, *call.args)
        if processed is None:  # A1111: a script that returns nothing leaves the job to process p
            processed = process_images(p)
    if not isinstance(processed, Processed):
        raise TypeError(f"run() returned {type(processed).__name__}, not modules.processing.Processed")
    return job.answer(answer_images(processed, made, job.request))
