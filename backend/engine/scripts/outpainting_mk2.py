"""A1111's "Outpainting mk2" (img2img): the picture grows side by side (left, right, up, down, each an img2img
pass of its own); each new border starts as noise shaped like the picture's own frequencies and matched to its
colours ("Fall-off exponent" shapes the noise, "Color variation" mixes in coloured noise), then is inpainted with
masked content "original". The final pictures are saved as the job's samples, with the first pass's infotext.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from backend.core.images import image_grid
from backend.engine.rng import fix_seed
from backend.engine.scripts.runner import pil_of


def _fft2(data: np.ndarray) -> np.ndarray:
    """Centred, orthonormal 2-D FFT of each channel."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _ifft2(data: np.ndarray) -> np.ndarray:
    return np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _falloff_window(rows: int, cols: int, std: float = 3.14) -> np.ndarray:
    """A window falling off from the centre of the spectrum, wider along the longer side."""
    scale_r, scale_c = rows / min(rows, cols), cols / min(rows, cols)
    r = (np.arange(rows) / rows * 2.0 - 1.0) * scale_r
    c = (np.arange(cols) / cols * 2.0 - 1.0) * scale_c
    return (1.0 / ((r[:, None] ** 2 + 1.0) * (c[None, :] ** 2 + 1.0))) ** (std / 3.14)


def _match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each channel of `source` (N x C) mapped so its histogram matches `reference`'s (M x C)."""
    out = np.empty_like(source)
    for ch in range(source.shape[1]):
        values, index, counts = np.unique(source[:, ch], return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(reference[:, ch], return_counts=True)
        quantiles = np.cumsum(counts) / source.shape[0]
        ref_quantiles = np.cumsum(ref_counts) / reference.shape[0]
        out[:, ch] = np.interp(quantiles, ref_quantiles, ref_values)[index.reshape(-1)]
    return out


def matched_noise(image: np.ndarray, mask: np.ndarray, noise_q: float, color_variation: float) -> np.ndarray:
    """`image` (H x W x 3, 0-1) with its masked area (`mask` H x W, 1 = new) filled by noise whose spectrum follows
    the picture's and whose colours match the kept pixels. Deterministic (a fixed noise seed), as A1111's."""
    mask_rgb = np.repeat(mask[:, :, None], 3, axis=2)
    new_area, kept = mask > 1e-6, mask < 1e-3
    windowed = image * (1.0 - mask_rgb)
    windowed = windowed / max(float(np.max(windowed)), 1e-8)
    windowed = windowed + np.average(image) * mask_rgb
    source = _fft2(windowed)
    distance = np.absolute(source)
    phase = source / np.maximum(distance, 1e-12)

    rng = np.random.default_rng(0)
    noise = rng.random(image.shape)
    grey = noise.mean(axis=2)
    noise = noise * color_variation + (1.0 - color_variation) * grey[:, :, None]
    noise_fft = _fft2(noise) * _falloff_window(image.shape[0], image.shape[1])[:, :, None]
    noise = np.real(_ifft2(noise_fft))
    shaped = np.absolute(_fft2(noise)) ** 2 * (distance ** noise_q) * phase
    shaped = np.real(_ifft2(shaped))
    shaped -= shaped.min()
    shaped /= max(float(shaped.max()), 1e-8)
    if new_area.any() and kept.any():
        shaped[new_area, :] = _match_histograms(shaped[new_area, :], image[kept, :])
    return np.clip(image * (1.0 - mask_rgb) + shaped * mask_rgb, 0.0, 1.0)


def _sides(width: int, height: int, pixels: int, directions: list[str]) -> dict[str, int]:
    """Pixels to add on each side, grown so the final size is a multiple of 64 (A1111's rounding)."""
    side = {d: (pixels if d in directions else 0) for d in ("left", "right", "up", "down")}
    target_w = math.ceil((width + side["left"] + side["right"]) / 64) * 64
    target_h = math.ceil((height + side["up"] + side["down"]) / 64) * 64
    if side["left"]:
        side["left"] = side["left"] * (target_w - width) // (side["left"] + side["right"])
    if side["right"]:
        side["right"] = target_w - width - side["left"]
    if side["up"]:
        side["up"] = side["up"] * (target_h - height) // (side["up"] + side["down"])
    if side["down"]:
        side["down"] = target_h - height - side["up"]
    return side


def run(args: dict, job, generate):
    req = job.request
    pixels, blur = int(args["pixels"]), int(args["mask_blur"])
    directions = [d.lower() for d in args["direction"]]
    init = job.init_images[0].convert("RGB")
    side = _sides(init.width, init.height, pixels, directions)
    blur_x = blur if side["left"] or side["right"] else 0
    blur_y = blur if side["up"] or side["down"] else 0
    base = req.model_copy(update={"inpaint_full_res": False, "inpainting_fill": 1, "inpainting_mask_invert": 0,
                                  "mask_blur": None, "mask_blur_x": blur_x * 4, "mask_blur_y": blur_y * 4,
                                  "batch_size": 1, "n_iter": 1, "do_not_save_grid": True, "do_not_save_samples": True,
                                  "script_name": None, "script_args": [], "resize_mode": 0})
    passes = [d for d in ("left", "right", "up", "down") if side[d] > 0]
    chains = req.batch_size * req.n_iter
    job.plan(chains * len(passes), chains * len(passes) * job.steps_of(base))
    seed = fix_seed(req.seed)
    first_text: list[str] = []

    def expand(picture: Image.Image, grow: int, where: str, chain_seed: int) -> Image.Image:
        horizontal = where in ("left", "right")
        add_w, add_h = (grow, 0) if horizontal else (0, grow)
        res_w, res_h = picture.width + add_w, picture.height + add_h
        canvas_w, canvas_h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
        canvas = Image.new("RGB", (canvas_w, canvas_h))
        canvas.paste(picture, (grow if where == "left" else 0, grow if where == "up" else 0))
        mask = Image.new("L", (canvas_w, canvas_h), 255)
        ImageDraw.Draw(mask).rectangle((grow + blur_x if where == "left" else 0, grow + blur_y if where == "up" else 0,
                                        canvas_w - grow - blur_x if where == "right" else res_w,
                                        canvas_h - grow - blur_y if where == "down" else res_h), fill=0)
        noised = matched_noise(np.asarray(canvas, dtype=np.float64) / 255.0, np.asarray(mask, dtype=np.float64) / 255.0,
                               float(args["noise_q"]), float(args["color_variation"]))
        filled = Image.fromarray((noised * 255.0).round().astype(np.uint8), "RGB")
        width = max(64, min(req.width, res_w // 8 * 8)) if horizontal else canvas_w
        height = max(64, min(req.height, res_h // 8 * 8)) if not horizontal else canvas_h
        box = (0 if where == "left" else canvas_w - width, 0 if where == "up" else canvas_h - height,
               width if where == "left" else canvas_w, height if where == "up" else canvas_h)
        result = generate(base.model_copy(update={"width": width, "height": height, "seed": chain_seed}),
                          [filled.crop(box)], mask=mask.crop(box))
        made = [image for image in result.images if not image.is_grid]
        if made:
            if not first_text:
                first_text.append(made[0].infotext)
            filled.paste(pil_of(made[0]).convert("RGB"), box[:2])
        return filled.crop((0, 0, res_w, res_h))

    finals = []
    for chain in range(chains):
        picture = init
        for where in passes:
            picture = expand(picture, side[where], where, seed + chain)
        finals.append(job.sample(picture, first_text[0] if first_text else "", seed + chain))
    images = list(finals)
    if len(finals) > 1:
        grid = job.grid(image_grid([pil_of(i) for i in finals]), finals[0])
        if grid is not None:
            images.insert(0, grid)
    return job.answer(images)
