"""ControlNet as an always-on script of the app: a request's `alwayson_scripts.controlnet` entry into the
job's checked units with their model files resolved (`ControlNetService.units_for_job`); the engine's
side is `backend.engine.controlnet.script`."""
from __future__ import annotations

from typing import Any


class ControlNetScript:
    name = "controlnet"

    def __init__(self, service):
        self.service = service  # backend.controlnet.service.ControlNetService

    def for_job(self, entry: Any, *, img2img: bool) -> list | None:
        """The enabled units (`UnitJob`s), or None when no unit is enabled."""
        return self.service.units_for_job({self.name: entry}, img2img=img2img) or None
