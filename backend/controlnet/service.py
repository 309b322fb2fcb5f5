"""The app process's side of ControlNet: model and preprocessor lists, units into job payloads, detect.

Used by `EaselService` (jobs), the `/controlnet/*` API routes and the UI. Control images are
decoded and checked here; the backend process receives PIL images and resolved model files.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image

from backend.client import BackendError, Job
from backend.core.errors import UserError
from backend.controlnet.model_files import ControlNetRegistry, FileFamilies
from backend.core.tensor_headers import read_shapes
from backend.core.preprocessor_catalog import ANNOTATORS_FOLDER, all_preprocessors, find_preprocessor
from backend.controlnet.units import ControlUnit, UnitJob, check_unit, parse_controlnet_args

log = logging.getLogger("easel.controlnet")

API_VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers


def checkpoint_family(path: Path) -> str | None:
    """sd1 / sd2 / sdxl / flux / sd3 from a checkpoint's key names (header only), or None when unknown."""
    try:
        keys = read_shapes(path).keys()
    except (UserError, OSError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.endswith(("double_blocks.0.img_attn.qkv.weight", "single_transformer_blocks.0.proj_mlp.weight"))
           for k in keys):
        return "flux"
    if any(k.endswith("joint_blocks.0.x_block.attn.qkv.weight") for k in keys):
        return "sd3"
    return None


class ControlNetService:
    def __init__(self, paths, options, client):
        self.paths = paths
        self.options = options
        self.client = client
        self.registry = ControlNetRegistry(paths.controlnet_dirs)
        self._checkpoint_families = FileFamilies()

    @property
    def annotators_dir(self) -> Path:
        return self.paths.models_dir / ANNOTATORS_FOLDER

    def refresh(self) -> None:
        self.registry.refresh()

    # -- lists ----------------------------------------------------------------------------------
    def family_of_checkpoint(self, ckpt) -> str | None:
        return self._checkpoint_families.get(ckpt.path, lambda: checkpoint_family(ckpt.path))

    def model_titles(self, ckpt=None) -> list[str]:
        """"None" then the models that fit `ckpt`'s family (all when no checkpoint is given or known)."""
        family = self.family_of_checkpoint(ckpt) if ckpt is not None else None
        return ["None"] + self.registry.titles_for(family)

    @staticmethod
    def module_names(alias_names: bool = False) -> list[str]:
        return [p.display_name if alias_names else p.name for p in all_preprocessors()]

    @staticmethod
    def module_detail(alias_names: bool = False) -> dict:
        return {(p.display_name if alias_names else p.name): {"model_free": p.model_free, "sliders": p.sliders()}
                for p in all_preprocessors()}

    def control_types(self) -> dict:
        """/controlnet/control_types: each Control Type's preprocessors and models, by the same rules as the UI's
        Control Type radio (`backend.core.control_types`, sd-webui-controlnet's labels and filters)."""
        from backend.core import control_types as ct

        titles = ["None"] + self.registry.titles()
        return {name: {"module_list": ct.modules_for(name), "model_list": ct.models_for(name, titles),
                       "default_option": ct.default_module(name), "default_model": ct.default_model(name, titles)}
                for name in ct.control_type_names()}

    # -- jobs -----------------------------------------------------------------------------------
    def units_for_job(self, alwayson_scripts: dict | None, *, img2img: bool) -> list:
        """The enabled units of a request, checked and with their model files resolved (for the backend)."""
        units = parse_controlnet_args(alwayson_scripts)
        jobs = []
        for index, unit in enumerate(units):
            if not unit.enabled:
                continue
            what = f"ControlNet unit {index}"
            try:
                find_preprocessor(unit.module)
            except UserError as exc:
                raise UserError(f"{what}: {exc.message}") from exc
            check_unit(unit, index)
            if unit.image is None and not img2img:
                raise UserError(f"{what} is enabled but has no control image: upload an image (API: the unit's "
                                f"\"image\" field, base64).")
            path, title = None, "None"
            if unit.has_model:
                try:
                    found = self.registry.find(unit.model)
                except UserError:
                    self.registry.refresh()  # a file added since the last scan
                    try:
                        found = self.registry.find(unit.model)
                    except UserError as exc:
                        raise UserError(f"{what}: {exc.message}", status=exc.status) from exc
                path, title = str(found.path), found.title
            jobs.append(UnitJob(unit=_copy_unit(unit), model_path=path, model_title=title))
        return jobs

    # -- detect ---------------------------------------------------------------------------------
    def detect(self, module: str, images: list[Image.Image], processor_res: int = 512, threshold_a: float = -1,
               threshold_b: float = -1, timeout: float = 3600) -> list[Image.Image]:
        """Run a preprocessor on images in the backend (where annotators and their weights live)."""
        return self.detect_with_poses(module, images, processor_res, threshold_a, threshold_b, timeout)[0]

    def detect_with_poses(self, module: str, images: list[Image.Image], processor_res: int = 512,
                          threshold_a: float = -1, threshold_b: float = -1,
                          timeout: float = 3600) -> tuple[list[Image.Image], list[dict]]:
        """`detect`, plus the OpenPose JSON per image when the preprocessor finds poses (else an empty list)."""
        job = self.submit_detect(module, images, processor_res, threshold_a, threshold_b)
        if not job.done.wait(timeout):
            raise BackendError(f"controlnet_detect did not finish within {timeout} s")
        if job.error:
            raise job.error
        return detected_maps_and_poses(job.result)

    def submit_detect(self, module: str, images: list[Image.Image], processor_res: int = 512,
                      threshold_a: float = -1, threshold_b: float = -1) -> Job:
        """Queue a detect job; its result is read by `detected_maps_and_poses`."""
        pre = find_preprocessor(module)
        if not images:
            raise UserError("No input images were given to detect on.")
        payload = {"module": pre.name, "images": [img.copy() for img in images], "processor_res": processor_res,
                   "threshold_a": threshold_a, "threshold_b": threshold_b}
        return self.client.submit("controlnet_detect", payload)


def detected_maps_and_poses(result: dict) -> tuple[list[Image.Image], list[dict]]:
    """A detect job's result: the detected maps, and the OpenPose JSON of the images where poses were found."""
    poses = [p for p in result["poses"] if p is not None]
    return [Image.open(io.BytesIO(p)) for p in result["maps"]], poses


def _copy_unit(unit: ControlUnit) -> ControlUnit:
    from dataclasses import replace
    return replace(unit, image=unit.image.copy() if unit.image is not None else None,
                   mask=unit.mask.copy() if unit.mask is not None else None)

