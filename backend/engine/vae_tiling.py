"""Tiled VAE encode/decode, for images too large to run through the VAE in one piece.

The image (or latent) is cut into overlapping tiles; each tile runs through the VAE alone, and the
results are blended with weights that ramp linearly across the overlaps (a partition of unity), so
neighbouring tiles fade into each other and no seam shows. Peak memory is that of one tile.

The VAE's GroupNorm layers would otherwise normalize each tile by its own statistics, which shifts
colours from tile to tile. So the tiles run twice: the first pass only gathers every GroupNorm's
per-group mean and variance over all tiles, the second normalizes every tile with those shared
(whole-image) statistics and produces the output.

`should_tile` decides for the "Automatic" setting: tile when the image is above 2048x2048 pixels, or
when the estimated activation memory of an untiled pass is over half of the memory free on the device.
"""
from __future__ import annotations

import torch

SETTING_CHOICES = ("Automatic", "Always", "Never")
AUTO_MAX_PIXELS = 2048 * 2048
DEFAULT_TILE = 512  # pixels
DEFAULT_OVERLAP = 64  # pixels


def estimate_decode_bytes(width: int, height: int, dtype: torch.dtype, widest_channels: int = 256) -> int:
    """Rough peak activation memory of an untiled VAE pass: ~3 live tensors of the widest full-size layer."""
    return 3 * widest_channels * width * height * dtype.itemsize


def should_tile(setting: str, width: int, height: int, *, dtype: torch.dtype, free_bytes: int | None,
                tile: int = DEFAULT_TILE) -> bool:
    if setting == "Never" or (width <= tile and height <= tile):
        return False
    if setting == "Always":
        return True
    if width * height > AUTO_MAX_PIXELS:
        return True
    return free_bytes is not None and estimate_decode_bytes(width, height, dtype) > free_bytes // 2


def spans(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Start/end of overlapping tiles covering [0, size): near-equal steps (starts multiples of `align`),
    each overlap at least `overlap`, the last tile flush with the end."""
    if size <= tile:
        return [(0, size)]
    stride = max(1, tile - overlap)
    count = max(2, -(-(size - overlap) // stride))  # ceil
    starts = [round(i * (size - tile) / (count - 1) / align) * align for i in range(count)]
    starts[-1] = size - tile
    return [(s, s + tile) for s in starts]


def _ramp(length: int, start: int, end: int, size: int, overlap: int) -> torch.Tensor:
    """1-D blend weights for a tile covering [start, end) of `size`: ramps over the overlap at inner edges."""
    w = torch.ones(length)
    ramp = max(1, min(overlap, length // 2))
    up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
    if start > 0:
        w[:ramp] = up
    if end < size:
        w[length - ramp:] = torch.minimum(w[length - ramp:], up.flip(0))
    return w


def _blend(tiles_fn, in_h: int, in_w: int, tile_in: int, overlap_in: int, scale: float, out_channels: int,
           out_device, out_dtype=torch.float32, align: int = 1) -> torch.Tensor:
    """Run `tiles_fn(y0, y1, x0, x1) -> (1, C, h, w)` over overlapping input tiles and blend the outputs."""
    out_h, out_w = round(in_h * scale), round(in_w * scale)
    acc = torch.zeros(1, out_channels, out_h, out_w, dtype=out_dtype, device=out_device)
    weight = torch.zeros(1, 1, out_h, out_w, dtype=out_dtype, device=out_device)
    overlap_out = round(overlap_in * scale)
    for y0, y1 in spans(in_h, tile_in, overlap_in, align):
        for x0, x1 in spans(in_w, tile_in, overlap_in, align):
            part = tiles_fn(y0, y1, x0, x1).to(out_device, out_dtype)
            oy0, ox0 = round(y0 * scale), round(x0 * scale)
            h, w = part.shape[-2:]
            wy = _ramp(h, oy0, oy0 + h, out_h, overlap_out).to(out_device, out_dtype)
            wx = _ramp(w, ox0, ox0 + w, out_w, overlap_out).to(out_device, out_dtype)
            mask = (wy[:, None] * wx[None, :])[None, None]
            acc[:, :, oy0:oy0 + h, ox0:ox0 + w] += part * mask
            weight[:, :, oy0:oy0 + h, ox0:ox0 + w] += mask
    return acc / weight


class _SharedGroupNorm:
    """Makes every GroupNorm of a module first gather statistics over all tiles, then apply the shared ones."""

    def __init__(self, module: torch.nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.sums: dict[int, list] = {}
        self.shared: dict[int, tuple] = {}

    def _collect(self, gn: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        xs = x.float().reshape(x.shape[0], gn.num_groups, -1)
        entry = self.sums.setdefault(id(gn), [0.0, 0.0, 0])
        count = xs.shape[0] * xs.shape[2]
        entry[0] = entry[0] + xs.mean(dim=2).sum(0) * xs.shape[2]
        entry[1] = entry[1] + (xs * xs).mean(dim=2).sum(0) * xs.shape[2]
        entry[2] += count
        return torch.nn.functional.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)

    def _apply(self, gn: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self.shared[id(gn)]
        n, c = x.shape[:2]
        xs = x.float().reshape(n, gn.num_groups, -1)
        y = ((xs - mean[None, :, None]) * inv_std[None, :, None]).reshape(x.shape)
        if gn.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * gn.weight.float().reshape(shape) + gn.bias.float().reshape(shape)
        return y.to(x.dtype)

    def _patch(self, fn) -> None:
        for gn in self.norms:
            gn.forward = (lambda x, gn=gn: fn(gn, x))

    def _unpatch(self, gn) -> None:
        gn.__dict__.pop("forward", None)

    def restore(self) -> None:
        for gn in self.norms:
            self._unpatch(gn)

    def gather(self) -> None:
        self._patch(self._collect)

    def share(self) -> None:
        self.restore()
        self.norms = [gn for gn in self.norms if id(gn) in self.sums]  # those the tiles ran through
        for gn in self.norms:
            total, squares, count = self.sums[id(gn)]
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            self.shared[id(gn)] = (mean, torch.rsqrt(var + gn.eps))
        self._patch(self._apply)


def _two_pass(module: torch.nn.Module, run):
    """run() once to gather the GroupNorm statistics over all tiles, then again with them shared."""
    norms = _SharedGroupNorm(module)
    if not norms.norms:
        return run()
    try:
        norms.gather()
        run()
        norms.share()
        return run()
    finally:
        norms.restore()


def _call_as(module: torch.nn.Module, fn, *args):
    """Call `module` with `fn` as its forward for once, so its hooks (the device policy's) still run."""
    module.forward = fn
    try:
        return module(*args)
    finally:
        module.__dict__.pop("forward", None)


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 downsample: int = 8) -> torch.Tensor:
    """Decode one latent (1, C, h, w) (already divided by the scaling factor) -> (1, 3, H, W) float32.

    The decoder's input convolution and middle block (with its attention) run on the whole latent:
    they work at latent resolution, where memory is small, and their attention is global. The up
    blocks, where memory grows with the image, run tile by tile on those features. `tile` and
    `overlap` are in image pixels; the result is assembled on the latent's device.
    """
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    features = _call_as(dec, lambda x: dec.mid_block(dec.conv_in(x), None), z)

    def tail(h):
        for up in dec.up_blocks:
            h = up(h, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    tile_l, overlap_l = max(1, tile // downsample), max(1, overlap // downsample)
    return _two_pass(dec, lambda: _blend(
        lambda y0, y1, x0, x1: _call_as(dec, tail, features[:, :, y0:y1, x0:x1]),
        features.shape[-2], features.shape[-1], tile_l, overlap_l, downsample, 3, z.device))


@torch.no_grad()
def encode_tiled(vae, x: torch.Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 downsample: int = 8) -> torch.Tensor:
    """Encode one image (1, 3, H, W) in [-1, 1] -> the latent distribution's mean (1, C, h, w) float32.

    The down blocks run tile by tile and their outputs (at latent resolution) are blended; the middle
    block (with its global attention) and the output layers then run on the whole latent.
    """
    enc = vae.encoder
    tile = max(downsample, tile // downsample * downsample)
    overlap = max(downsample, overlap // downsample * downsample)

    def head(t):
        h = enc.conv_in(t)
        for down in enc.down_blocks:
            h = down(h)
        return h

    channels = int(enc.down_blocks[-1].resnets[-1].conv2.out_channels)
    features = _two_pass(enc, lambda: _blend(
        lambda y0, y1, x0, x1: _call_as(enc, head, x[:, :, y0:y1, x0:x1]),
        x.shape[-2], x.shape[-1], tile, overlap, 1 / downsample, channels, x.device, align=downsample))
    features = features.to(next(enc.parameters()).dtype)
    moments = _call_as(enc, lambda h: enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h)))), features)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    return moments.chunk(2, dim=1)[0].float()
