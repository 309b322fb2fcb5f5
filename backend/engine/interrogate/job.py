"""The "interrogate" job: a picture and a model name -> {"caption": text}, as A1111's interrogate API answers."""
from __future__ import annotations

from typing import Any

from backend.core.errors import UserError
from backend.core.job_options import JobOptions


def run_interrogate_job(payload: dict[str, Any], runtime, control) -> dict[str, str]:
    options = JobOptions.of(payload.get("options"))
    model = payload["model"]
    run = {"deepdanbooru": _deepbooru, "clip": _clip}.get(model)
    if run is None:
        raise UserError("Model not found", status=404)
    try:
        caption = run(payload["image"], runtime, control, options)
    finally:
        runtime.release(bool(options["interrogate_keep_models_in_memory"]))
    return {"caption": caption}


class _QuietControl:
    """A caption made inside another job (a script's): that job's Interrupt, none of its progress bar."""

    def __init__(self, control):
        self.control = control

    def begin(self, *_args) -> None:
        pass

    def step(self, _preview) -> None:
        pass

    def interrupted(self) -> bool:
        return self.control.interrupted()


def caption_for_script(image, model: str, runtime, control, options) -> str:
    """A caption of `image` by `model` ("clip" / "deepdanbooru") for a script running in a generation job, with the
    job's settings; `UserError` when the models are missing (offline) or the job was interrupted (409)."""
    if runtime is None:
        raise UserError("No interrogator is available in this backend.", status=503)
    return run_interrogate_job({"model": model, "image": image, "options": dict(JobOptions.of(options))},
                               runtime, _QuietControl(control))["caption"]


def _deepbooru(image, runtime, control, options: JobOptions) -> str:
    from backend.engine.interrogate import deepbooru

    folder = runtime.models_dir / deepbooru.FOLDER
    control.begin(1, 100)
    path = runtime.model_file(deepbooru.FOLDER, deepbooru.find_model_file(folder), deepbooru.FILE_NAME,
                              deepbooru.URL, "Interrogate DeepBooru", _download_progress(control))
    _stop_if_interrupted(control)
    model = runtime.network("deepdanbooru", path, deepbooru.load_model)
    _stop_if_interrupted(control)
    probabilities = deepbooru.scores(model, image, runtime.device, runtime.dtype)
    return deepbooru.tags_text(model.tags, probabilities, options)


def _clip(image, runtime, control, options: JobOptions) -> str:
    """A1111's interrogator: the BLIP caption, then for each category file its best lines by CLIP."""
    from backend.engine.interrogate import blip, clip

    models = runtime.models_dir
    control.begin(1, 100)
    progress = _download_progress(control)
    what = "Interrogate CLIP"
    blip_path = runtime.model_file(blip.FOLDER, blip.find_model_file(models / blip.FOLDER), blip.FILE_NAME, blip.URL,
                                   f"{what} (BLIP captions)", progress)
    vocab = runtime.model_file(f"{blip.FOLDER}/{blip.VOCAB_FOLDER}", blip.find_vocab(models / blip.FOLDER),
                               blip.VOCAB_NAME, blip.VOCAB_URL, f"{what} (BLIP's bert-base-uncased tokenizer)", progress)
    clip_path = runtime.model_file(clip.FOLDER, clip.find_model_file(models / clip.FOLDER), clip.FILE_NAME, clip.URL,
                                   what, progress)
    categories = runtime.model_folder(clip.CATEGORY_FOLDER, {f"{t}.txt": clip.CATEGORY_URL.format(t)
                                                             for t in clip.CATEGORY_TYPES},
                                      f"{what} (its category files)", progress)
    _stop_if_interrupted(control)
    captioner = runtime.network("blip", blip_path, lambda path: blip.load_captioner(path, vocab))
    caption = captioner.caption(image, runtime.device, runtime.dtype, options["interrogate_clip_num_beams"],
                                options["interrogate_clip_min_length"], options["interrogate_clip_max_length"],
                                control.interrupted)
    _stop_if_interrupted(control)
    runtime.release(bool(options["interrogate_keep_models_in_memory"]), kinds=("blip",))
    _stop_if_interrupted(control)
    model = runtime.network("clip", clip_path, clip.load_model)
    features = clip.image_features(model, image, runtime.device, runtime.dtype)
    ranks = bool(options["interrogate_return_ranks"])
    text = caption
    for category in clip.read_categories(categories, options["interrogate_clip_skip_categories"]):
        for line, share in clip.rank(model, features, category.items, category.topn,
                                     int(options["interrogate_clip_dict_limit"]), runtime.device, runtime.dtype,
                                     lambda: _stop_if_interrupted(control)):
            text += f", ({line}:{share:.3f})" if ranks else f", {line}"
    return text


def _stop_if_interrupted(control) -> None:
    if control.interrupted():
        raise UserError("Interrogation was interrupted; no caption was made.", status=409)


def _download_progress(control):
    """A download's progress as the job's progress bar (0-100)."""
    shown = [0]

    def progress(done: int, total: int) -> None:
        percent = int(done * 100 / total) if total else 0
        while shown[0] < min(percent, 99):
            shown[0] += 1
            control.step(None)
    return progress
