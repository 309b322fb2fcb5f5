"""Face restoration with GFPGAN or CodeFormer: detect, align, restore, paste back with a soft mask.

Each face found (see `face_detection`) is warped onto the FFHQ 512 template, run through the model
(input and output in [-1, 1]), warped back and blended in through a feathered mask that is exactly
zero outside the face's square, so pixels away from faces never change. An image with no face comes
back unchanged, with a note.

Models: the newest `GFPGAN*.pth` in `models/GFPGAN` (`--gfpgan-models-path`), a CodeFormer file in
`models/Codeformer` (`--codeformer-models-path`); when absent, `GFPGANv1.4.pth` / `codeformer-v0.1.0.pth`
are downloaded there on first use if the machine is online. CodeFormer's weight `w` is A1111's:
0 = strongest restoration, 1 = closest to the input.

`restore_faces_for_job(ctx, images)` is what the generation pipelines call on their decoded images
when the request has `restore_faces`: it applies the restorer chosen in the settings
(`face_restoration_model`, `code_former_weight`) and records `Face restoration: <name>` in the infotext.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from backend.core.errors import JobInterrupted, UserError
from backend.core.job_options import JobOptions
from backend.core.paths import list_files
from backend.engine.postprocess.face_detection import FACE_SIZE, align_face
from backend.postprocess.model_files import MODEL_EXTENSIONS, canonical_name, is_helper_file

log = logging.getLogger("easel.postprocess")

DOWNLOADS = {
    "GFPGAN": ("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth", "GFPGANv1.4.pth"),
    "CodeFormer": ("https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
                   "codeformer-v0.1.0.pth"),
}
NO_FACE_NOTE = "No face was found in the image; it is unchanged."


def find_model_file(name: str, folders: list[Path]) -> Path | None:
    """The restorer's model file in its folders: files naming the model first, newest version (by name) last wins."""
    files = [p for p in list_files(folders, MODEL_EXTENSIONS) if not is_helper_file(p)]
    if not files:
        return None
    named = [p for p in files if name.lower() in p.name.lower()]
    pool = named or files
    return sorted(pool, key=lambda p: p.name.lower())[-1]


def model_path(name: str, folders: list[Path]) -> Path:
    """The model file for restorer `name`, downloaded into its first folder when missing and online."""
    from backend.downloads import download_file, network_available

    found = find_model_file(name, folders)
    if found is not None:
        return found
    url, filename = DOWNLOADS[name]
    target = folders[0] / filename
    if not network_available(url):
        raise UserError(f"No {name} model found in {folders[0]}, and it cannot be downloaded (no internet connection). "
                        f"Download {url} and put it in {folders[0]}.", status=404)
    log.info("downloading the %s model into %s", name, folders[0])
    return download_file(url, target)


def restore_crop(loaded, crop: np.ndarray, codeformer_weight: float = 0.5) -> np.ndarray:
    """Run a face model on one aligned 512x512x3 uint8 crop -> restored 512x512x3 uint8."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].to(loaded.device, torch.float32)
    x = (x / 127.5 - 1.0).to(loaded.dtype)
    net = loaded.model.model
    with torch.inference_mode():
        if loaded.kind == "codeformer":
            y = net(x, weight=float(codeformer_weight))[0]
        elif loaded.model.architecture.id == "GFPGAN":
            y = net(x, return_rgb=False, randomize_noise=False)[0]
        else:  # another FaceSR architecture spandrel knows: its own calling convention, [0, 1] in and out
            y = loaded.model((x + 1) / 2) * 2 - 1
    y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    return y


def paste_face(target: np.ndarray, restored: np.ndarray, matrix: np.ndarray) -> None:
    """Blend a restored aligned face back into `target` (HxWx3 uint8, changed in place) through a soft mask.

    Only the bounding box of the face's square is touched; the mask is the square warped back, eroded and
    feathered in proportion to the face's size, so it is zero outside the square.
    """
    import cv2

    h, w = target.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [FACE_SIZE, 0, 1], [0, FACE_SIZE, 1], [FACE_SIZE, FACE_SIZE, 1]], dtype=np.float64)
    mapped = corners @ inverse.T
    x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return
    shifted = inverse.copy()
    shifted[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(restored, shifted, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), shifted, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))
    edge = max(1, int(np.sqrt(float(mask.sum()))) // 20)
    mask = cv2.erode(mask, np.ones((2 * edge + 1, 2 * edge + 1), np.uint8))
    mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0)
    mask[mask < 1e-3] = 0.0
    region = target[y0:y1, x0:x1].astype(np.float32)
    blended = region * (1.0 - mask[..., None]) + face.astype(np.float32) * mask[..., None]
    target[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


@dataclass
class RestoreOutcome:
    image: Image.Image
    faces: int
    notes: list[str] = field(default_factory=list)


def restore_faces(image: Image.Image, loaded, detector, *, codeformer_weight: float = 0.5,
                  should_stop: Callable[[], bool] | None = None) -> RestoreOutcome:
    """Restore every face of `image` with a loaded GFPGAN/CodeFormer model; other pixels stay as they are."""
    from backend.engine.postprocess.upscalers import join_alpha, split_alpha

    gray = image.mode in ("L", "LA", "1") or image.mode.startswith("I")
    rgb_image, alpha = split_alpha(image)
    rgb = np.array(rgb_image)
    faces = detector.detect(rgb)
    if not faces:
        return RestoreOutcome(image, 0, [NO_FACE_NOTE])
    out = rgb.copy()
    for face in faces:
        if should_stop is not None and should_stop():
            raise JobInterrupted()
        crop, matrix = align_face(rgb, face)
        restored = restore_crop(loaded, crop, codeformer_weight)
        paste_face(out, restored, matrix)
    result = Image.fromarray(out)
    if gray:
        result = result.convert("L")
    return RestoreOutcome(join_alpha(result, alpha), len(faces))


def restore_faces_for_job(ctx, images: list[Image.Image]) -> list[Image.Image]:
    """What txt2img/img2img call on their decoded images when `restore_faces` is set.

    Uses the settings' restorer (`face_restoration_model`) and CodeFormer weight (`code_former_weight`), records
    `Face restoration: <name>` in the infotext, and turns a missing model into a warning (the images are kept).
    """
    runtime = ctx.postprocess
    if runtime is None:
        ctx.warnings.append("Face restoration skipped: this job has no post-processing models.")
        return images
    runtime.apply_options(ctx.options)
    options = JobOptions.of(ctx.options)
    try:
        name = canonical_name(options["face_restoration_model"])
        loaded = runtime.load_face_restorer(name)
        detector = runtime.face_detector(options["face_detector"], loaded.device)
    except UserError as exc:
        note = f"Face restoration skipped: {exc.message}"
        if note not in ctx.warnings:
            ctx.warnings.append(note)
        return images
    weight = float(options["code_former_weight"])
    ctx.extra_params["Face restoration"] = name
    should_stop = getattr(getattr(ctx, "control", None), "interrupted", None)  # Interrupt, checked between faces
    restored = []
    try:
        for img in images:
            outcome = restore_faces(img, loaded, detector, codeformer_weight=weight, should_stop=should_stop)
            restored.append(outcome.image)
    except JobInterrupted:  # Interrupt between faces: the images not restored yet are kept as they are
        restored += images[len(restored):]
    finally:
        runtime.release()
    return restored
