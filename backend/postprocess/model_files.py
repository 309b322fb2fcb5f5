"""Post-processing model files as the app lists them: which files count, and the face restorers offered.

Torch-free: the app lists upscalers (`upscaler_catalog`) and face restorers from these; the backend
loads the files (`backend.engine.postprocess.model_files`) and runs them.
"""
from __future__ import annotations

from pathlib import Path

from backend.core.errors import UserError

MODEL_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
# facexlib's helper networks share folders with GFPGAN/CodeFormer in A1111 installs; they are not restorers.
HELPER_FILE_PREFIXES = ("detection_", "parsing_", "alignment_", "headpose_", "matting_", "assessment_", "recognition_")

FACE_RESTORERS = ("CodeFormer", "GFPGAN")


def is_helper_file(path: Path) -> bool:
    return path.name.lower().startswith(HELPER_FILE_PREFIXES)


def canonical_name(name: str) -> str:
    """A face restorer's name as listed, from any casing; `UserError` for an unknown one."""
    for known in FACE_RESTORERS:
        if (name or "").strip().lower() == known.lower():
            return known
    raise UserError(f"Unknown face restoration model {name!r}. Available: {', '.join(FACE_RESTORERS)}.")
