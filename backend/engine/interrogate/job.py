"""The "interrogate" job: a picture and a model name -> {"caption": text}, as A1111's interrogate API answers."""
from __future__ import annotations

from typing import Any

from backend.core.errors import UserError
from backend.core.job_options import JobOptions


def run_interrogate_job(payload: dict[str, Any], runtime, control) -> dict[str, str]:
    options = JobOptions.of(payload.get("options"))
    model = payload["model"]
    if model != "deepdanbooru":
        raise UserError("Model not found", status=404)
    try:
        caption = _deepbooru(payload["image"], runtime, control, options)
    finally:
        runtime.release(bool(options["interrogate_keep_models_in_memory"]))
    return {"caption": caption}


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
