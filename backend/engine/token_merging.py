"""Token merging for Stable Diffusion (ToMe for SD; A1111's settings `token_merging_ratio`, `_hr`, `_img2img`).

In the UNet's transformer blocks at the highest resolution (the latent's own size: tomesd's `max_downsample=1`,
as A1111 applies it), the tokens entering self-attention (`attn1`) are merged before it and unmerged after it,
so the attention runs on fewer tokens. The merging is a bipartite soft matching: the latent is cut into 2x2 cells,
the top-left token of each cell is a destination (A1111 turns tomesd's random choice off), every other token is a
source; each source is paired with its most similar destination (cosine similarity of the block's input tokens),
and the `r = ratio x tokens` best-matched sources are averaged into their destinations. After the attention, every
merged source takes its destination's output again. Cross-attention and the feed-forward layers are left alone.

`token_merging(unet, ratio)` installs this as forward hooks on the UNet for the time of one sampling pass and
removes them when the pass ends (also when it fails); ratio 0 installs nothing, so the pixels are the same as
without it. Nothing is stored on the modules.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

MergeFn = Callable[[torch.Tensor], torch.Tensor]


def _destination_order(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices [1, n, 1] of the sources and the destinations of an h x w token grid (row-major): one
    destination at the top-left of each 2x2 cell; rows and columns left over at an odd edge are sources."""
    hs, ws = h // 2, w // 2
    marks = torch.zeros(h, w, dtype=torch.int64, device=device)
    marks[0:hs * 2:2, 0:ws * 2:2] = -1
    order = marks.reshape(1, -1, 1).argsort(dim=1, stable=True)
    n_dst = hs * ws
    return order[:, n_dst:], order[:, :n_dst]


def bipartite_merge(metric: torch.Tensor, h: int, w: int, r: int) -> tuple[MergeFn, MergeFn]:
    """(merge, unmerge) for tokens [B, h*w, C] whose similarity is read from `metric`; `r` sources merged."""
    batch, n, _ = metric.shape
    if r <= 0 or h < 2 or w < 2:
        return (lambda x: x), (lambda x: x)
    src_at, dst_at = _destination_order(h, w, metric.device)
    n_src, n_dst = src_at.shape[1], dst_at.shape[1]
    r = min(r, n_src)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return (x.gather(1, src_at.expand(x.shape[0], n_src, c)), x.gather(1, dst_at.expand(x.shape[0], n_dst, c)))

    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(normed)
        best, best_dst = (a @ b.transpose(-1, -2)).max(dim=-1)  # each source's most similar destination
        ranked = best.argsort(dim=-1, descending=True, stable=True)[..., None]
        kept, merged = ranked[:, r:], ranked[:, :r]  # sources left alone / averaged into a destination
        into = best_dst[..., None].gather(1, merged)
        src_all = src_at.expand(batch, n_src, 1)
        kept_at, merged_at = src_all.gather(1, kept), src_all.gather(1, merged)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        c = x.shape[-1]
        rest = src.gather(1, kept.expand(batch, n_src - r, c))
        moving = src.gather(1, merged.expand(batch, r, c))
        dst = dst.scatter_reduce(1, into.expand(batch, r, c), moving, reduce="mean")
        return torch.cat([rest, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        rest, dst = x[:, :n_src - r], x[:, n_src - r:]
        out = x.new_zeros(batch, n, c)
        out.scatter_(1, dst_at.expand(batch, n_dst, c), dst)
        out.scatter_(1, kept_at.expand(batch, n_src - r, c), rest)
        out.scatter_(1, merged_at.expand(batch, r, c), dst.gather(1, into.expand(batch, r, c)))
        return out

    return merge, unmerge


def _transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's transformer blocks with a self-attention (`attn1`) and a first norm (diffusers'
    BasicTransformerBlock)."""
    return [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "norm1") and hasattr(m, "attn2")]


def _first_arg(args: tuple, kwargs: dict, name: str) -> torch.Tensor | None:
    return args[0] if args else kwargs.get(name)


@contextlib.contextmanager
def token_merging(unet: nn.Module, ratio: float) -> Iterator[int]:
    """Merge tokens with `ratio` in `unet`'s highest-resolution self-attention while the block runs; yields the
    number of transformer blocks hooked (0 when `ratio` is 0)."""
    ratio = float(ratio or 0.0)
    if ratio <= 0:
        yield 0
        return
    latent_size: dict[str, tuple[int, int]] = {}
    pending: dict[int, tuple[MergeFn, MergeFn]] = {}
    handles = []

    def remember_size(_module, args, kwargs):
        sample = _first_arg(args, kwargs, "sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            latent_size["hw"] = (int(sample.shape[2]), int(sample.shape[3]))

    def plan(block_id: int):
        def hook(_module, args, kwargs):
            x = _first_arg(args, kwargs, "hidden_states")
            hw = latent_size.get("hw")
            pending.pop(block_id, None)
            if x is None or x.ndim != 3 or hw is None or x.shape[1] != hw[0] * hw[1]:
                return None  # not at the highest resolution (tomesd's max_downsample=1)
            pending[block_id] = bipartite_merge(x, hw[0], hw[1], int(x.shape[1] * ratio))
            return None
        return hook

    def merge_input(block_id: int):
        def hook(_module, args, kwargs):
            fns = pending.get(block_id)
            if fns is None:
                return None
            if args:
                return (fns[0](args[0]),) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=fns[0](kwargs["hidden_states"]))
        return hook

    def unmerge_output(block_id: int):
        def hook(_module, _args, output):
            fns = pending.pop(block_id, None)
            if fns is None:
                return None
            return fns[1](output)
        return hook

    blocks = _transformer_blocks(unet)
    try:
        handles.append(unet.register_forward_pre_hook(remember_size, with_kwargs=True))
        for block in blocks:
            key = id(block)
            handles.append(block.register_forward_pre_hook(plan(key), with_kwargs=True))
            handles.append(block.attn1.register_forward_pre_hook(merge_input(key), with_kwargs=True))
            handles.append(block.attn1.register_forward_hook(unmerge_output(key)))
        yield len(blocks)
    finally:
        for handle in handles:
            handle.remove()


def ratio_for_pass(options, *, hires: bool = False, img2img: bool = False, overridden: tuple = ()) -> float:
    """A1111's choice of ratio: the hires. fix pass uses `token_merging_ratio_hr` when not 0; img2img uses
    `token_merging_ratio_img2img` when not 0, unless the request's override_settings name `token_merging_ratio`;
    otherwise `token_merging_ratio`."""
    base = float(options["token_merging_ratio"])
    if hires:
        return float(options["token_merging_ratio_hr"]) or base
    if img2img:
        if "token_merging_ratio" in overridden and base:
            return base
        return float(options["token_merging_ratio_img2img"]) or base
    return base

