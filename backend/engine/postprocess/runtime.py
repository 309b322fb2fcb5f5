"""What the backend process holds for post-processing: the model cache, the upscaler registry, the face detectors.

One `PostprocessRuntime` lives in the backend process (built in `worker_main`) and is handed to the
Extras job and, as `JobContext.postprocess`, to the generation pipelines (hires. fix upscalers, Restore faces).
"""
from __future__ import annotations

from pathlib import Path

from backend.engine.postprocess.face_detection import FaceDetectors
from backend.engine.postprocess.model_files import LoadedModel, PostprocessModelCache
from backend.engine.postprocess.upscalers import model_file
from backend.postprocess.upscaler_catalog import Upscaler, UpscalerRegistry

DEVICE_PARTS = ("esrgan", "gfpgan", "codeformer")


class PostprocessRuntime:
    def __init__(self, paths, args=None, policies: dict | None = None, cache_limit: int = 4):
        if policies is None:
            from backend.engine.devices import DevicePolicy
            policies = {part: DevicePolicy.from_args(args, part=part) for part in DEVICE_PARTS}
        self.paths = paths
        self.policies = policies
        self.cache = PostprocessModelCache(policies, limit=cache_limit)
        self.detectors = FaceDetectors(paths.models_dir, list(paths.gfpgan_dirs) + list(paths.codeformer_dirs))

    def apply_options(self, options: dict) -> None:
        """Settings that change placement (`cpu_bf16`), taken at the start of each job."""
        for policy in self.policies.values():
            apply = getattr(policy, "apply_options", None)
            if apply is not None:
                apply(options)

    def upscalers(self) -> UpscalerRegistry:
        return UpscalerRegistry.from_paths(self.paths)

    def load_upscaler(self, up: Upscaler) -> LoadedModel:
        return self.cache.get(model_file(up), "upscaler")

    def face_restorer_folders(self, name: str) -> list[Path]:
        return list(self.paths.gfpgan_dirs if name == "GFPGAN" else self.paths.codeformer_dirs)

    def load_face_restorer(self, name: str) -> LoadedModel:
        from backend.engine.postprocess.face_restore import model_path
        from backend.postprocess.model_files import canonical_name

        name = canonical_name(name)
        return self.cache.get(model_path(name, self.face_restorer_folders(name)), name.lower())

    def face_detector(self, mode: str, device):
        return self.detectors.get(mode, device)

    def release(self) -> None:
        self.cache.release()

    def clear(self) -> None:
        self.cache.clear()

    def describe(self) -> str:
        return ", ".join(f"{part}={policy.device}" for part, policy in self.policies.items())
