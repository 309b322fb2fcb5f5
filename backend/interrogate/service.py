"""The app process's side of interrogation: a picture and a model name checked, then the backend's job.

Used by `EaselService` (as `service.interrogate`), `POST /sdapi/v1/interrogate` and the img2img tab's Interrogate
buttons. A1111's model names: "clip" (a BLIP caption with the category lines CLIP ranks best) and "deepdanbooru"
(DeepDanbooru's tags).
"""
from __future__ import annotations

from typing import Callable

from PIL import Image

from backend.client import Job
from backend.core.errors import UserError

MODELS = ("clip", "deepdanbooru")
CATEGORY_FOLDER = "interrogate"  # models/interrogate: the CLIP category files


class InterrogateService:
    def __init__(self, paths, options, client):
        self.paths = paths
        self.options = options
        self.client = client

    def category_names(self) -> list[str]:
        """The CLIP category files of models/interrogate, by name (the choices of interrogate_clip_skip_categories)."""
        folder = self.paths.models_dir / CATEGORY_FOLDER
        return sorted(p.name[:-len(".txt")] for p in folder.glob("*.txt")) if folder.is_dir() else []

    def submit_interrogate(self, image: Image.Image | None, model: str,
                           listener: Callable[[Job], None] | None = None) -> Job:
        """Queue the "interrogate" job; its result is {"caption": text}. Errors in A1111's words and statuses."""
        if image is None:
            raise UserError("Image not found", status=404)
        if model not in MODELS:
            raise UserError("Model not found", status=404)
        payload = {"image": image.convert("RGB"), "model": model, "options": self.options.as_dict()}
        return self.client.submit("interrogate", payload, listener)
