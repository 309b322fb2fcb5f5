"""A selectable AUTOMATIC1111 script from an extension (`Script.run(p, *args)`), run in the job through the
compatibility layer (`modules/`): the script gets A1111's `p` for the job's request, and its
`modules.processing.process_images(p)` runs the ordinary pipeline here (`generate`: one progress bar, Interrupt
stops the script), with `p.extra_generation_params` in the infotexts. What `run` returns (`Processed`, or None:
A1111 then processes `p` itself) is the job's answer; pictures the script made itself are encoded with the
infotexts it gives. The file's `on_cfg_denoiser` callbacks run in every job (`backend/engine/a1111_callbacks.py`).
"""
from __future__ import annotations

from backend.core.images import encode_png
from backend.core.schemas import GeneratedImage
from backend.engine.a1111_bridge import load_script, processing_object, request_of, script_context
from backend.engine.scripts.runner import pil_of


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

    context = script_context(job.ctx, where, process_images)
    p = processing_object(job.request, job.img2img, job.init_images, job.mask, call.args)
    with running(context):
        processed = script.run(p, *call.args)
        if processed is None:  # A1111: a script that returns nothing leaves the job to process p
            processed = process_images(p)
    if not isinstance(processed, Processed):
        raise TypeError(f"run() returned {type(processed).__name__}, not modules.processing.Processed")
    return job.answer(_answer_images(processed, made, job.request))


def _answer_images(processed, made: dict, request) -> list[GeneratedImage]:
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
