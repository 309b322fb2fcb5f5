"""Image geometry and mask operations for img2img and inpainting (A1111 semantics).

Resize modes, the binary/blurred masks, the "only masked" crop region, the
"fill" of masked content, the overlay that pastes the untouched pixels back,
and the canvas growth used by outpainting, in the backend process (the mask blur and the "fill" run
in torch). No model here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from backend.core.errors import UserError
# flatten and the choice lists are the app's too (torch-free); the img2img pipeline reads them here.
from backend.core.image_prep import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT, OUTPAINT_DIRECTIONS, flatten  # noqa: F401
from backend.core.request_checks import LATENT_RESIZE

def resize_cover(img: Image.Image, w: int, h: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Scale to cover w x h keeping the aspect ratio, then crop the middle ("Crop and resize")."""
    ratio = max(w / img.width, h / img.height)
    sw, sh = max(w, round(img.width * ratio)), max(h, round(img.height * ratio))
    img = img.resize((sw, sh), resample)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def resize_fill(img: Image.Image, w: int, h: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """Fit inside w x h keeping the aspect ratio, then fill the empty bands by stretching the edge rows/columns."""
    ratio = min(w / img.width, h / img.height)
    fw, fh = max(1, min(w, round(img.width * ratio))), max(1, min(h, round(img.height * ratio)))
    fitted = img.resize((fw, fh), resample)
    out = Image.new(img.mode, (w, h))
    left, top = (w - fw) // 2, (h - fh) // 2
    out.paste(fitted, (left, top))
    if fh < h:
        if top > 0:
            out.paste(fitted.crop((0, 0, fw, 1)).resize((fw, top), resample), (left, 0))
        bottom = h - top - fh
        if bottom > 0:
            out.paste(fitted.crop((0, fh - 1, fw, fh)).resize((fw, bottom), resample), (left, top + fh))
    if fw < w:
        if left > 0:
            out.paste(fitted.crop((0, 0, 1, fh)).resize((left, fh), resample), (0, top))
        right = w - left - fw
        if right > 0:
            out.paste(fitted.crop((fw - 1, 0, fw, fh)).resize((right, fh), resample), (left + fw, top))
    return out


def resize_image(mode: int, img: Image.Image, w: int, h: int) -> Image.Image:
    """A1111's resize modes 0-2 (mode 3, latent upscale, resizes the latents instead: the image is returned as is)."""
    if (img.width, img.height) == (w, h) or mode == LATENT_RESIZE:
        return img
    if mode == 0:
        return img.resize((w, h), Image.Resampling.LANCZOS)
    if mode == 1:
        return resize_cover(img, w, h)
    return resize_fill(img, w, h)


def binary_mask(mask: Image.Image, round_mask: bool = True) -> Image.Image:
    """Mask image -> 'L' (white = change). A mask with real transparency uses its alpha, as A1111 does."""
    if mask.mode in ("RGBA", "LA", "PA", "P"):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            mask = alpha
        else:
            mask = rgba.convert("L")
    else:
        mask = flatten(mask).convert("L")
    if round_mask:
        mask = mask.point(lambda v: 255 if v > 128 else 0)
    return mask


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """Gaussian blur of the mask (separately along x and y), A1111's mask blur."""
    if blur_x <= 0 and blur_y <= 0:
        return mask
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    for sigma, dim in ((blur_x, 3), (blur_y, 2)):
        if sigma <= 0:
            continue
        k = 2 * int(2.5 * sigma + 0.5) + 1
        xs = torch.arange(k, dtype=torch.float32) - k // 2
        kernel = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).view(1, 1, *((1, k) if dim == 3 else (k, 1)))
        pad = (k // 2, k // 2, 0, 0) if dim == 3 else (0, 0, k // 2, k // 2)
        t = F.conv2d(F.pad(t, pad, mode="reflect" if t.shape[dim] > k // 2 else "replicate"), kernel)
    return Image.fromarray(t[0, 0].round().clamp(0, 255).byte().numpy(), "L")


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2) of the mask's non-zero pixels grown by `pad`, clamped to the image."""
    arr = np.asarray(mask)
    ys, xs = np.nonzero(arr)
    if len(xs) == 0:
        raise UserError("The mask is empty: paint the area to change (or use img2img without a mask).")
    h, w = arr.shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h))


def expand_to_ratio(region: tuple[int, int, int, int], target_w: int, target_h: int,
                    image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow a crop region to the target's aspect ratio, staying inside the image where it can."""
    x1, y1, x2, y2 = region
    ratio_target = target_w / target_h
    w, h = x2 - x1, y2 - y1
    if w / h < ratio_target:  # too narrow: widen
        want = min(image_w, round(h * ratio_target))
        x1, x2 = _grow(x1, x2, want, image_w)
    else:  # too flat: heighten
        want = min(image_h, round(w / ratio_target))
        y1, y2 = _grow(y1, y2, want, image_h)
    return x1, y1, x2, y2


def _grow(a: int, b: int, want: int, limit: int) -> tuple[int, int]:
    extra = want - (b - a)
    a -= extra // 2
    b += extra - extra // 2
    if a < 0:
        b, a = b - a, 0
    if b > limit:
        a, b = max(0, a - (b - limit)), limit
    return a, b


def fill_masked(img: Image.Image, mask: Image.Image) -> Image.Image:
    """'fill' masked content: the masked area takes smooth colours spread in from the unmasked area.

    Push-pull: average the known pixels over a pyramid, then fill each level's
    holes from the coarser level, so colours flow in from every side.
    """
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    known = torch.from_numpy((np.asarray(mask) < 128).astype(np.float32))[None, None]
    if known.sum() == 0:
        return img
    levels = [(arr * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        num, den = levels[-1]
        levels.append((F.avg_pool2d(num, 2, ceil_mode=True), F.avg_pool2d(den, 2, ceil_mode=True)))
    num, den = levels[-1]
    estimate = num / den.clamp_min(1e-6)
    for num, den in reversed(levels[:-1]):
        up = F.interpolate(estimate, size=num.shape[-2:], mode="bilinear", align_corners=False)
        weight = den.clamp(0, 1)
        estimate = num / den.clamp_min(1e-6) * weight + up * (1 - weight)
    out = arr * known + estimate * (1 - known)
    return Image.fromarray(out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy(), "RGB")


def overlay_of(img: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original pixels with alpha = 255 - mask: composited over the result, it keeps the unmasked area."""
    overlay = img.convert("RGBA")
    overlay.putalpha(ImageOps.invert(mask_for_overlay.convert("L")))
    return overlay


def apply_overlay(result: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image) -> Image.Image:
    """Paste the generated picture back (into its crop box for "Only masked") under the overlay."""
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_cover(result, w, h).convert("RGBA"), (x, y))
        result = base
    out = result.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def grow_canvas(img: Image.Image, pixels: int, directions: list[str], mask_blur: int = 0
                ) -> tuple[Image.Image, Image.Image]:
    """Outpainting: a larger canvas (edges stretched outwards as a start) and the mask of the new area.

    The new size is rounded up to a multiple of 8 on the grown sides. The mask
    reaches `mask_blur` pixels into the original so the seam can blend.
    """
    directions = [d.lower() for d in directions]
    bad = [d for d in directions if d not in OUTPAINT_DIRECTIONS]
    if bad or not directions:
        raise UserError(f"Outpainting directions must be some of {', '.join(OUTPAINT_DIRECTIONS)}; got {directions}.")
    if not 8 <= pixels <= 2048:
        raise UserError(f"Outpainting pixels must be between 8 and 2048, got {pixels}.")
    img = img.convert("RGB")
    left = pixels if "left" in directions else 0
    right = pixels if "right" in directions else 0
    up = pixels if "up" in directions else 0
    down = pixels if "down" in directions else 0
    w, h = img.width + left + right, img.height + up + down
    # Round the grown sides so the canvas is a multiple of 8 (the latent grid).
    if w % 8:
        extra = 8 - w % 8
        right, left = (right + extra, left) if right else (right, left + extra)
        w += extra
    if h % 8:
        extra = 8 - h % 8
        down, up = (down + extra, up) if down else (down, up + extra)
        h += extra
    arr = np.asarray(img)
    canvas = np.pad(arr, ((up, down), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, dtype=np.uint8)
    inset = mask_blur
    y1 = up + (inset if up else 0)
    y2 = up + img.height - (inset if down else 0)
    x1 = left + (inset if left else 0)
    x2 = left + img.width - (inset if right else 0)
    mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 0
    return Image.fromarray(canvas, "RGB"), Image.fromarray(mask, "L")
