"""The app process's side of interrogation: a picture and a model name checked, then the backend's job.

Used by `EaselService` (as `service.interrogate`), `POST /sdapi/v1/interrogate` and the img2img tab's
Interrogate button. A1111's names: "deepdanbooru" (tags from DeepDanbooru). A1111's other model, "clip" (a BLIP
caption ranked against CLIP), is not built in Easel yet and is answered with a 501 that says so.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image

from backend.client import Job
from backend.core.errors import UserError

MODELS = ("deepdanbooru",)
NOT_YET = {"clip": "Interrogate CLIP (a BLIP caption ranked with CLIP) is not available in Easel yet; "
                   "use model 'deepdanbooru'."}


class InterrogateService:
    def __init__(self, options, client):
        self.options = options
        self.client = client

    def submit_interrogate(self, image: Image.Image | None, model: str,
                           listener: Callable[[Job], None] | None = None) -> Job:
        """Queue the "interrogate" job; its result is {"caption": text}. Errors in A1111's words and statuses."""
        if image is None:
            raise UserError("Image not found", status=404)
        if model in NOT_YET:
            raise UserError(NOT_YET[model], status=501)
        if model not in MODELS:
            raise UserError("Model not found", status=404)
        payload = {"image": image.convert("RGB"), "model": model, "options": self.options.as_dict()}
        return self.client.submit("interrogate", payload, listener)
