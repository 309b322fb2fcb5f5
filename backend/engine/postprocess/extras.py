"""The Extras job: upscale and restore faces in finished images, as A1111's Extras tab does.

For each image, in A1111's order (upscale, then GFPGAN, then CodeFormer; with `upscale_first` false the
API's older order, face restoration first):

- **Upscale** (when Upscaler 1 is not "None"): by a factor, or to a width x height (scale to cover,
  then, with "crop to fit", the middle cut out). Upscaler 2, when set and visible, upscales the same
  input and is blended over the first with its visibility.
- **GFPGAN** / **CodeFormer** (when their visibility is above 0): faces restored, then blended with
  the input by the visibility; CodeFormer's weight 0 is the strongest effect.

The steps are recorded as A1111 writes them ("Postprocess upscale by: 4, Postprocess upscaler: ...,
GFPGAN visibility: 1, ...") in the PNG's `extras` chunk and in `parameters` (appended to the image's
own generation parameters when it had some). Images are saved into `outputs/extras-images/` (UI), the
batch-from-directory output folder under their own names, or not at all (API, as A1111).
Grayscale, RGBA (the alpha channel is resized beside) and 16-bit images are handled.
"""
from __future__ import annotations

import html
import io
import logging
from pathlib import Path

from PIL import Image, PngImagePlugin

from backend.core.errors import JobInterrupted, UserError
from backend.core.image_codec import folder_images, image_format_of, open_folder_image
from backend.core.infotext import quote, read_infotext_from_image
from backend.core.job_options import JobOptions
from backend.core.paths import IMAGE_EXTENSIONS
from backend.engine.postprocess import face_restore, upscalers
from backend.postprocess.schemas import ExtrasImage, ExtrasRequest, ExtrasResult
from backend.postprocess.upscaler_catalog import check_extras_size

log = logging.getLogger("easel.extras")


def _format_info(info: dict) -> str:
    return ", ".join(f"{k}: {quote(str(v))}" for k, v in info.items() if v is not None)


def _round(value: float) -> float | int:
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


class _Progress:
    """Tiles and face passes reported as steps to the job control; Interrupt stops between them."""

    def __init__(self, control):
        self.control = control

    def step(self) -> None:
        self.control.step(None)

    def stopped(self) -> bool:
        return self.control.interrupted()


def _upscale_step(image: Image.Image, req: ExtrasRequest, runtime, info: dict, tile: int, overlap: int,
                  progress: _Progress) -> Image.Image:
    registry = runtime.upscalers()
    first = registry.find(req.upscaler_1)
    if first.kind == "none":
        return image
    second = registry.find(req.upscaler_2) if req.upscaler_2 not in (None, "", "None") else None
    if req.resize_mode == 1:
        scale = max(req.upscaling_resize_w / image.width, req.upscaling_resize_h / image.height)
        info["Postprocess upscale to"] = f"{req.upscaling_resize_w}x{req.upscaling_resize_h}"
    else:
        scale = float(req.upscaling_resize)
        info["Postprocess upscale by"] = _round(scale)

    def run(up):
        out = upscalers.upscale(image, up, scale, load=runtime.load_upscaler, tile=tile, overlap=overlap,
                                on_tile=progress.step, should_stop=progress.stopped)
        if req.resize_mode == 1 and req.upscaling_crop:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            left, top = (out.width - w) // 2, (out.height - h) // 2
            out = out.crop((left, top, left + w, top + h))
        return out

    result = run(first)
    info["Postprocess upscaler"] = first.name
    if second is not None and second.kind != "none" and req.extras_upscaler_2_visibility > 0:
        other = run(second)
        if other.mode != result.mode:
            other = other.convert(result.mode)
        result = Image.blend(result, other, float(req.extras_upscaler_2_visibility))
        info["Postprocess upscaler 2"] = second.name
    if req.resize_mode == 1 and req.upscaling_crop:
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    return result


def _face_step(image: Image.Image, name: str, visibility: float, weight: float, runtime, options: JobOptions,
               notes: list[str], progress: _Progress) -> Image.Image:
    loaded = runtime.load_face_restorer(name)
    detector = runtime.face_detector(options["face_detector"], loaded.device)
    outcome = face_restore.restore_faces(image, loaded, detector, codeformer_weight=weight, should_stop=progress.stopped)
    progress.step()
    for note in outcome.notes:
        if note not in notes:
            notes.append(note)
    if outcome.faces == 0 or visibility >= 1.0:
        return outcome.image
    restored = outcome.image if outcome.image.mode == image.mode else outcome.image.convert(image.mode)
    return Image.blend(image, restored, float(visibility))


def process_image(image: Image.Image, req: ExtrasRequest, runtime, options: dict,
                  progress: _Progress) -> tuple[Image.Image, str, list[str]]:
    """One image through the Extras steps -> (result, post-processing infotext, notes)."""
    options = JobOptions.of(options)
    tile, overlap = upscalers.tile_settings(options)
    info: dict[str, object] = {}
    notes: list[str] = []

    def faces(img: Image.Image) -> Image.Image:
        if req.gfpgan_visibility > 0:
            img = _face_step(img, "GFPGAN", req.gfpgan_visibility, 0.5, runtime, options, notes, progress)
            info["GFPGAN visibility"] = _round(req.gfpgan_visibility)
        if req.codeformer_visibility > 0:
            img = _face_step(img, "CodeFormer", req.codeformer_visibility, req.codeformer_weight, runtime, options,
                             notes, progress)
            info["CodeFormer visibility"] = _round(req.codeformer_visibility)
            info["CodeFormer weight"] = _round(req.codeformer_weight)
        return img

    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif image.mode in ("1", "I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float / bilevel -> 8-bit grayscale
        image = upscalers.split_alpha(image)[0].convert("L")
    if req.upscale_first:
        image = faces(_upscale_step(image, req, runtime, info, tile, overlap, progress))
    else:
        image = _upscale_step(faces(image), req, runtime, info, tile, overlap, progress)
    return image, _format_info(info), notes


def merged_parameters(existing: str | None, steps: str) -> str:
    """The `parameters` to store: the image's own generation parameters with the steps appended, or the steps."""
    if not existing:
        return steps
    return f"{existing}, {steps}" if steps else existing


def encode_result_png(image: Image.Image, parameters: str, steps: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if steps:
        info.add_text("extras", steps)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def planned_steps(size: tuple[int, int], req: ExtrasRequest, runtime, options: dict) -> int:
    """An estimate of the progress steps (model tiles and face passes) for one image of `size`."""
    width, height = size
    steps = int(req.gfpgan_visibility > 0) + int(req.codeformer_visibility > 0)
    tile, _ = upscalers.tile_settings(options)
    registry = runtime.upscalers()
    for name in {req.upscaler_1, req.upscaler_2 if req.extras_upscaler_2_visibility > 0 else "None"}:
        try:
            up = registry.find(name)
        except UserError:
            continue
        if up.kind == "model":
            scale = (max(req.upscaling_resize_w / width, req.upscaling_resize_h / height)
                     if req.resize_mode == 1 else req.upscaling_resize)
            steps += upscalers.planned_tiles(width, height, scale, up.scale, tile)
    return max(1, steps)


class _Input:
    """One image of the job: uploaded (already decoded) or a file of the input folder (decoded when its turn comes)."""

    def __init__(self, name: str, image: Image.Image | None = None, path: Path | None = None):
        self.name, self.image, self.path = name, image, path

    def size(self) -> tuple[int, int] | None:
        if self.image is not None:
            return self.image.size
        try:
            with open(self.path, "rb") as f:
                fmt = image_format_of(f.read(16))
            with Image.open(self.path, formats=(fmt,) if fmt else ()) as img:
                return img.size
        except Exception:  # noqa: BLE001  unreadable files are reported when their turn comes
            return None

    def load(self) -> Image.Image:
        if self.image is not None:
            return self.image
        return open_folder_image(self.path)


def _inputs(payload: dict, warnings: list[str]) -> list[_Input]:
    """The job's images; files of an input folder that are not images by name and content are left out, each with
    a warning in `warnings`."""
    if payload.get("input_dir") is None:
        return [_Input(name, image=image) for name, image in payload["images"]]
    folder = Path(payload["input_dir"])
    skipped: list[str] = []
    files = folder_images(folder, skipped)
    for warning in skipped:
        log.warning("extras: %s", warning)
    warnings.extend(skipped)
    if not files:
        raise UserError(f"The input folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}). " + " ".join(warnings))
    return [_Input(p.name, path=p) for p in files]


def _save(image: Image.Image, parameters: str, steps: str, payload: dict, options: JobOptions, name: str,
          warnings: list[str]) -> Path | None:
    """Save one result; a folder that cannot be written adds a warning (the image is still returned): None."""
    from backend.core.images import ImageFormat, save_image_or_warn

    fmt = ImageFormat.of(options)  # samples_format, jpeg_quality, webp_lossless
    extras_chunk = {"extras": steps} if steps else None
    with_info = options["enable_pnginfo"]
    if payload.get("output_dir") is not None:
        return save_image_or_warn(warnings, "image", image, Path(payload["output_dir"]), seed=None, infotext=parameters,
                                  fmt=fmt, forced_name=Path(name).stem or "image", with_pnginfo=with_info,
                                  extra_text=extras_chunk)
    target = Path(options["outdir_extras_samples"])
    folder = target if target.is_absolute() else Path(payload["data_dir"]) / target
    return save_image_or_warn(warnings, "image", image, folder, seed=None, infotext=parameters, fmt=fmt,
                              with_pnginfo=with_info, extra_text=extras_chunk)


def run_extras_job(payload: dict, runtime, control) -> ExtrasResult:
    """The backend's "extras" job.

    payload: request (ExtrasRequest), images [(name, PIL image)] or input_dir, output_dir (batch from directory),
    save (bool), options (settings dict), data_dir.
    """
    req: ExtrasRequest = payload["request"]
    options = JobOptions.of(payload["options"])
    check_extras_size(req)
    runtime.apply_options(options)
    warnings: list[str] = []
    inputs = _inputs(payload, warnings)
    if not inputs:
        raise UserError("Extras: no image to process.")
    progress = _Progress(control)
    sizes = [item.size() for item in inputs]
    control.begin(len(inputs), sum(planned_steps(size, req, runtime, options) for size in sizes if size))
    results: list[ExtrasImage] = []
    interrupted = False
    try:
        for i, item in enumerate(inputs):
            if control.interrupted():
                interrupted = True
                break
            control.set_job(i)
            try:
                image = item.load()
            except UserError as exc:
                log.error("extras: skipped %s: %s", item.name, exc.message)
                warnings.append(f"Skipped {item.name}: {exc.message}")
                continue
            existing = read_infotext_from_image(image)
            try:
                result, steps, notes = process_image(image, req, runtime, options, progress)
            except JobInterrupted:
                interrupted = True
                break
            parameters = merged_parameters(existing, steps)
            saved = (_save(result, parameters, steps, payload, options, item.name, warnings)
                     if payload.get("save") else None)
            png = encode_result_png(result, parameters, steps) if req.show_extras_results else b""
            results.append(ExtrasImage(png=png, name=item.name, infotext=steps, saved_path=str(saved) if saved else None,
                                       notes=[f"{item.name}: {n}" if len(inputs) > 1 else n for n in notes]))
    finally:
        runtime.release()
    if not results and not interrupted:
        raise UserError("No image could be processed: " + " ".join(warnings))
    notes = [n for r in results for n in r.notes]
    last = results[-1].infotext if results else ""
    body = "".join(f"<p>{html.escape(t)}</p>" for t in [last] + notes + warnings if t)
    if interrupted:
        body += "<p>Interrupted.</p>"
    return ExtrasResult(images=results, html_info=body, warnings=warnings + notes, interrupted=interrupted)
