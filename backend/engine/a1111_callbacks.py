"""The backend side of the extensions' `modules.script_callbacks` that run in every generation job, as A1111 runs
them (not only in jobs using a script of the file): the app sends the files that register one
(`payload["a1111_callbacks"]`: [(file, extension)], from `ExtensionScripts.backend_callback_files`); each job loads
them fresh (nothing is kept between jobs) and

- `on_cfg_denoiser`: a sampling hook of the job (`CFGDenoiserCallbacks`), after the always-on scripts' hooks;
- `on_before_image_saved` / `on_image_saved`: around the saving of each picture and grid of the job
  (`ImageSaveCallbacks`, given to `backend.core.images.save_image` as `before_save` / `after_save`);
- `on_model_loaded(sd_model)`: when the job's checkpoint is loaded into memory or switched to (a checkpoint other
  than the one the backend ran before), with `sd_model.sd_checkpoint_info` (`title`, `filename`, `name`,
  `model_name`, `hash`, `sha256`, `shorthash`), `sd_model.sd_model_hash`, `sd_model.sd_model_checkpoint` and
  `is_sd1` / `is_sd2` / `is_sdxl`.

A file that no longer loads is logged and skipped; a callback that raises is logged with its extension's name and
skipped (`modules.script_callbacks.call_each`): the job goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modules.sd_models import CheckpointInfo

if TYPE_CHECKING:
    from modules.script_callbacks import FileCallbacks

log = logging.getLogger("easel")


def load_callbacks(files) -> list[FileCallbacks]:
    """The callbacks of the files [(path, extension)], each file loaded fresh; one that fails is logged, skipped."""
    from modules.script_callbacks import FileCallbacks
    from modules.script_loading import load_script_file

    loaded = []
    for path, extension in files or ():
        try:
            script_file = load_script_file(path)
        except Exception as exc:  # noqa: BLE001  changed or broken since the app loaded it
            log.error("extension script %s (extension %s) skipped in this job: %s: %s", path, extension,
                      type(exc).__name__, exc)
            continue
        loaded.append(FileCallbacks(Path(path), str(extension), script_file.callbacks))
    return loaded


@dataclass
class ModelLoaded:
    """A1111's `sd_model` as scripts read it (`on_model_loaded(sd_model)`, `shared.sd_model`, `p.sd_model`): the
    checkpoint's description, not its weights (extensions that patch the model's modules are not supported)."""

    sd_checkpoint_info: CheckpointInfo
    sd_model_hash: str | None
    sd_model_checkpoint: str
    is_sd1: bool
    is_sd2: bool
    is_sdxl: bool
    is_sd3: bool = False  # Easel runs no SD3 checkpoint

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"sd_model.{name} is not available in Easel's AUTOMATIC1111 compatibility layer: "
                             "sd_model describes the checkpoint (sd_checkpoint_info, sd_model_hash, "
                             "sd_model_checkpoint, is_sd1, is_sd2, is_sdxl), not its modules.")


def model_loaded_info(checkpoint, family: str) -> ModelLoaded:
    info = CheckpointInfo.of(checkpoint)
    family = str(family or "").lower()
    return ModelLoaded(info, checkpoint.shorthash, str(checkpoint.path), is_sd1=family.startswith(("sd1", "sd15")),
                       is_sd2=family.startswith("sd2"), is_sdxl="xl" in family)


class JobCallbacks:
    """The extensions' backend callbacks for one job."""

    def __init__(self, files, options):
        self.files = load_callbacks(files)
        self.options = options

    def _context(self, file: FileCallbacks, ctx=None):
        from modules.context import ScriptContext

        if ctx is not None:
            from backend.engine.a1111_bridge import script_context
            return script_context(ctx, file.where)
        return ScriptContext(options=self.options, where=file.where)

    def _call(self, name: str, args: tuple, ctx=None) -> None:
        from modules.context import running
        from modules.script_callbacks import call_each

        for file in self.files:
            callbacks = getattr(file.registry, name)
            if callbacks:
                with running(self._context(file, ctx)):
                    call_each(callbacks, args, f"on_{name} of {file.where}")

    def sampling_hooks(self, ctx) -> list:
        """The job's `on_cfg_denoiser` callbacks as sampling hooks (one per file)."""
        from backend.engine.a1111_bridge import CFGDenoiserCallbacks
        return [CFGDenoiserCallbacks(f.registry.cfg_denoiser, self._context(f, ctx), f.where)
                for f in self.files if f.registry.cfg_denoiser]

    def model_loaded(self, checkpoint, family: str) -> None:
        self._call("model_loaded", (model_loaded_info(checkpoint, family),))

    def image_saving(self, ctx, request, img2img: bool) -> ImageSaveCallbacks | None:
        """The job's `on_before_image_saved` / `on_image_saved` callbacks, None when no file registers one."""
        if not any(f.registry.before_image_saved or f.registry.image_saved for f in self.files):
            return None
        return ImageSaveCallbacks(self, ctx, request, img2img)


def save_hooks(ctx) -> dict:
    """`save_image`'s `before_save` / `after_save` for a save of the job `ctx` (a JobContext, or None): the enabled
    extensions' on_before_image_saved / on_image_saved; {} when none registered."""
    hooks = getattr(ctx, "image_save", None)
    return {"before_save": hooks.before_save, "after_save": hooks.after_save} if hooks is not None else {}


class ImageSaveCallbacks:
    """`before_save` / `after_save` for `backend.core.images.save_image`: A1111's `ImageSaveParams(image, p,
    filename, pnginfo)`; what `on_before_image_saved` leaves in `params.image` and `params.pnginfo` is written."""

    def __init__(self, callbacks: JobCallbacks, ctx, request, img2img: bool):
        self.callbacks, self.ctx, self.request, self.img2img = callbacks, ctx, request, img2img
        self._p = None

    def _params(self, image, path: Path, pnginfo: dict):
        from modules.script_callbacks import ImageSaveParams

        if self._p is None and self.request is not None:
            from backend.engine.a1111_bridge import processing_object
            self._p = processing_object(self.request, self.img2img)
        return ImageSaveParams(image=image, p=self._p, filename=str(path), pnginfo=pnginfo)

    def before_save(self, image, path: Path, pnginfo: dict):
        params = self._params(image, path, pnginfo)
        self.callbacks._call("before_image_saved", (params,), self.ctx)
        return params.image, params.pnginfo

    def after_save(self, image, path: Path, pnginfo: dict) -> None:
        self.callbacks._call("image_saved", (self._params(image, path, pnginfo),), self.ctx)
