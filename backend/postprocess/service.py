"""The app process's side of post-processing: lists for the UI and API, and Extras jobs for the backend.

Used by `EaselService` (as `service.postprocess`), the `/sdapi/v1/extra-*`, `upscalers`, `face-restorers`
and `realesrgan-models` routes, and the Extras tab. Images are decoded and checked here; the backend
process receives PIL images (or a checked input folder) and runs the "extras" job.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from PIL import Image

from backend.client import Job
from backend.core.errors import UserError
from backend.core.request_checks import LATENT_UPSCALE_MODES, sd_upscale_args
from backend.postprocess.model_files import FACE_RESTORERS
from backend.postprocess.schemas import ExtrasRequest
from backend.postprocess.upscaler_catalog import (REALESRGAN_MODELS, Upscaler, UpscalerRegistry, check_extras_size,
                                                  upscaler_name)

log = logging.getLogger("easel.extras")

MAX_BATCH_IMAGES = 1000


class PostprocessService:
    def __init__(self, args, paths, options, client, batch_folder: Callable[..., Path]):
        self.args = args
        self.paths = paths
        self.options = options
        self.client = client
        self.batch_folder = batch_folder  # EaselService's check of folders given by users

    # -- lists --------------------------------------------------------------------------------------------
    def registry(self) -> UpscalerRegistry:
        return UpscalerRegistry.from_paths(self.paths)

    def upscalers(self) -> list[Upscaler]:
        return self.registry().all()

    def upscaler_names(self) -> list[str]:
        return [u.name for u in self.upscalers()]

    def hires_upscaler_names(self) -> list[str]:
        """What hires. fix offers: the latent modes, then every upscaler (as A1111's list)."""
        return list(LATENT_UPSCALE_MODES) + self.upscaler_names()

    def check_hires_upscaler(self, req) -> None:
        """Refuse an unknown `hr_upscaler` before the job is queued (the model folders are known here)."""
        name = getattr(req, "hr_upscaler", None)
        if not getattr(req, "enable_hr", False) or not name:
            return
        names = self.hires_upscaler_names()
        if name in names:
            return
        try:
            self.registry().find(name)
        except UserError:
            raise UserError(f"Unknown hires upscaler {name!r}. Available: {', '.join(names)}.") from None

    def check_sd_upscale(self, req) -> None:
        """Refuse an img2img "SD upscale" request with an unknown upscaler (name or index) before it is queued."""
        args = sd_upscale_args(req)
        if args is not None:
            upscaler_name(args.upscaler, self.registry())

    def face_restorers(self) -> list[dict]:
        """A1111's /sdapi/v1/face-restorers: [{name, cmd_dir}]."""
        folders = {"CodeFormer": self.paths.codeformer_dirs, "GFPGAN": self.paths.gfpgan_dirs}
        return [{"name": name, "cmd_dir": str(folders[name][0])} for name in FACE_RESTORERS]

    def realesrgan_models(self) -> list[dict]:
        """A1111's /sdapi/v1/realesrgan-models: [{name, path, scale}], the Real-ESRGAN models present or offered."""
        known = {entry[0] for entry in REALESRGAN_MODELS.values()}
        return [{"name": u.name, "path": str(u.path) if u.path and u.path.is_file() else u.url, "scale": u.scale}
                for u in self.upscalers() if u.family == "RealESRGAN" or u.name in known]

    # -- jobs -----------------------------------------------------------------------------------------------
    def _payload(self, req: ExtrasRequest, save: bool) -> dict:
        self._check(req)
        return {"request": req, "options": self.options.as_dict(), "data_dir": self.paths.data_dir, "save": save,
                "images": [], "input_dir": None, "output_dir": None}

    def _check(self, req: ExtrasRequest) -> None:
        check_extras_size(req)
        registry = self.registry()
        registry.find(req.upscaler_1)
        if req.upscaler_2 not in (None, "", "None"):
            registry.find(req.upscaler_2)

    def submit_extras(self, req: ExtrasRequest, images: list[tuple[str, Image.Image]], save: bool = True,
                      listener: Callable[[Job], None] | None = None) -> Job:
        """Post-process decoded images (Single image / Batch). `save`: into outputs/extras-images (the UI does)."""
        if not images:
            raise UserError("Extras: no image was given.")
        if len(images) > MAX_BATCH_IMAGES:
            raise UserError(f"Extras: at most {MAX_BATCH_IMAGES} images at a time, got {len(images)}.")
        payload = self._payload(req, save)
        payload["images"] = [(name or f"image-{i + 1}", img.copy()) for i, (name, img) in enumerate(images)]
        return self.client.submit("extras", payload, listener)

    def submit_extras_folder(self, req: ExtrasRequest, input_dir: str, output_dir: str,
                             listener: Callable[[Job], None] | None = None) -> Job:
        """Batch from directory: every image of `input_dir`, saved under its own name into `output_dir`
        (empty: outputs/extras-images)."""
        if self.args.hide_ui_dir_config:
            raise UserError("Batch folders are disabled on this server (--hide-ui-dir-config).", status=403)
        payload = self._payload(req, save=True)
        payload["input_dir"] = self.batch_folder(input_dir, "Input", must_exist=True)
        if output_dir and output_dir.strip():
            payload["output_dir"] = self.batch_folder(output_dir, "Output", write=True)  # checked and created
        return self.client.submit("extras", payload, listener)
