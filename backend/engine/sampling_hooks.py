"""The denoiser's hook interface: the one way features change what happens while an image is sampled.

A `SamplingHook` overrides any of the hook points below; each has a no-op default, so a hook writes only
what it needs. A job's hooks are handed to `CFGDenoiser` when it is built (`hooks=`) and never changed
afterwards; the denoiser calls them in order and tells them where sampling stands through a `StepState`
(which pass, which step, the size). The inpainting latent mask, soft inpainting and ControlNet are hooks;
so are extensions' (docs/sampling_hooks.md has the points in detail and a worked example).

Per model call (a sampler may call the model more than once per step):
    unet_inputs(state, call) -> call         change the UNet's input, timestep, text context or extra kwargs
    residuals(state, call) -> dict | None    extra residuals added inside the UNet (summed over hooks); for
                                             FLUX transformers `controlnet_block_samples` /
                                             `controlnet_single_block_samples` (`BlockResiduals`)
    combine_cfg(state, cond, uncond, scale, combined) -> combined    the classifier-free guidance mix
    after_denoise(state, x, denoised) -> denoised    the x0 prediction the sampler receives
Per batch (before its prompts are encoded; `Generation.batches` calls it, not the denoiser):
    before_batch(batch) -> None              the batch's prompts, negative prompts, seeds may be changed in place
Per step and per pass:
    after_step(state, x, denoised) -> None   a step finished (observe only: x is the sampler's, after the step)
    after_sampling(state, latents) -> latents        a pass finished, before decoding
    after_decode(state, images) -> images    the pass's latents were decoded to pictures
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from PIL import Image

# Pass names a hook can see in `StepState.pass_name`.
FIRST_PASS = "first"  # txt2img's (only or first) pass, and img2img's pass
HIRES_PASS = "hires"  # txt2img's hires. fix pass, at the upscaled size


@dataclass(frozen=True)
class StepState:
    """Where sampling stands when a hook is called.

    `step` counts the sampler's steps from 0 and is the step being computed (during a model call) or just
    finished (`after_step`); `total_steps` is this pass's count. `width`/`height` are the pass's size in pixels.
    `sigma` is the noise level of the model call (None outside a model call)."""

    pass_name: str
    step: int
    total_steps: int
    width: int
    height: int
    sigma: torch.Tensor | None = None

    @property
    def fraction(self) -> float:
        """How far through the pass this step is (step / total steps), as guidance ranges are written."""
        return self.step / max(1, self.total_steps)


@dataclass
class BatchState:
    """One batch of a job, before its prompts are encoded and its noise drawn: `batch_number` from 0, the batch's
    `prompts`, `negative_prompts`, `seeds` and `subseeds` (one per picture). A `before_batch` hook may change the
    lists' entries (not their length); the batch is made, and its infotexts written, with what they hold after."""

    batch_number: int
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]


@dataclass(frozen=True)
class UNetCall:
    """One UNet evaluation as the denoiser is about to run it.

    With CFG the batch holds the conditional rows then the unconditional ones; `cond_mask` is 1 for
    conditional rows and 0 for unconditional ones (None when CFG is off: every row is conditional).
    `sample` is the scaled model input (an inpainting UNet's extra channels included), `timestep` the
    UNet's timestep per row, `context` the text features, `added_cond_kwargs` SDXL's pooled text and size
    embedding (None for SD 1.x/2.x). `with_changes(...)` gives a changed copy."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    added_cond_kwargs: dict | None = None
    cond_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # further keyword arguments for the UNet

    def with_changes(self, **changes) -> "UNetCall":
        return replace(self, **changes)


class SamplingHook:
    """Base class of sampling hooks: every hook point is a no-op until a subclass overrides it."""

    def before_batch(self, batch: BatchState) -> None:
        """A batch is about to be made (see `BatchState`)."""

    def unet_inputs(self, state: StepState, call: UNetCall) -> UNetCall:
        return call

    def residuals(self, state: StepState, call: UNetCall) -> dict | None:
        """{"down_block_additional_residuals": tuple, "mid_block_additional_residual": tensor} (UNets), or
        {"controlnet_block_samples": BlockResiduals, "controlnet_single_block_samples": BlockResiduals} (FLUX
        transformers), or None for none."""
        return None

    def combine_cfg(self, state: StepState, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                    combined: torch.Tensor) -> torch.Tensor:
        """`cond`/`uncond`: the model's x0 predictions; `combined`: the mix so far (A1111's, or an earlier hook's)."""
        return combined

    def after_denoise(self, state: StepState, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        return denoised

    def after_step(self, state: StepState, x: torch.Tensor, denoised: torch.Tensor | None) -> None:
        pass

    def after_sampling(self, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def after_decode(self, state: StepState, images: list[Image.Image]) -> list[Image.Image]:
        return images


# The keyword arguments of diffusers' FluxTransformer2DModel that take per-block residuals (ControlNets).
BLOCK_RESIDUAL_KEYS = ("controlnet_block_samples", "controlnet_single_block_samples")


class BlockResiduals(Sequence):
    """Residuals for a transformer's blocks, one entry per block: what FLUX ControlNets give
    `FluxTransformer2DModel` as `controlnet_block_samples` / `controlnet_single_block_samples`.

    Holds each contribution's few tensors and how they map onto the `count` blocks (spread: k tensors each
    cover ceil(count / k) consecutive blocks, as diffusers maps InstantX's; repeat: block i takes tensor
    i mod k, as x-flux adds XLabs'); an entry is the sum of the contributions for that block, computed when
    the transformer reads it, so summing units costs no memory. Its length is `count`, so the transformer maps
    entry i to block i."""

    def __init__(self, count: int, parts: Sequence[tuple[Sequence[torch.Tensor], bool]] = ()):
        self.count = int(count)
        self.parts = [(list(samples), bool(repeat)) for samples, repeat in parts if len(samples)]
        if not self.parts:
            raise ValueError("BlockResiduals needs at least one non-empty contribution")

    @classmethod
    def spread(cls, samples: Sequence[torch.Tensor], count: int, *, repeat: bool = False) -> "BlockResiduals":
        return cls(count, [(samples, repeat)])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        total = None
        for samples, repeat in self.parts:
            n = len(samples)
            t = samples[index % n] if repeat else samples[min(n - 1, index // math.ceil(self.count / n))]
            total = t if total is None else total + t
        return total

    def __add__(self, other) -> "BlockResiduals":
        if not isinstance(other, BlockResiduals):
            other = BlockResiduals.spread(list(other), self.count)
        if other.count != self.count:
            raise ValueError(f"residuals for {self.count} and {other.count} blocks cannot be summed")
        return BlockResiduals(self.count, self.parts + other.parts)

    def __radd__(self, other) -> "BlockResiduals":
        return BlockResiduals.spread(list(other), self.count) + self


def add_block_residuals(a, b):
    """Two hooks' per-block residuals summed (`BlockResiduals`, or plain lists of equal length)."""
    if isinstance(a, BlockResiduals) or isinstance(b, BlockResiduals):
        return a + b
    if len(a) != len(b):
        raise ValueError(f"per-block residuals of {len(a)} and {len(b)} entries cannot be summed")
    return [x + y for x, y in zip(a, b)]


def _overrides(hook: SamplingHook, point: str) -> bool:
    return getattr(type(hook), point, None) is not getattr(SamplingHook, point)


def run_before_batch(hooks: Sequence[SamplingHook], batch: BatchState) -> bool:
    """The hooks' `before_batch` on `batch`, in order; False when none has one (the batch is as it was)."""
    called = False
    for hook in hooks:
        if _overrides(hook, "before_batch"):
            hook.before_batch(batch)
            called = True
    return called


class HookChain:
    """A denoiser's hooks, in order, with one method per hook point that runs them all.

    Points a hook does not override are skipped, so a job without hooks (or with no-op hooks) samples
    exactly as it would without any."""

    def __init__(self, hooks: Sequence[SamplingHook] = ()):
        for hook in hooks:
            if not isinstance(hook, SamplingHook):
                raise TypeError(f"{hook!r} is not a SamplingHook")
        self.hooks: tuple[SamplingHook, ...] = tuple(hooks)
        self._by_point = {point: tuple(h for h in self.hooks if _overrides(h, point))
                          for point in ("unet_inputs", "residuals", "combine_cfg", "after_denoise", "after_step",
                                        "after_sampling", "after_decode")}

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __iter__(self):
        return iter(self.hooks)

    def unet_inputs(self, state: StepState, call: UNetCall) -> UNetCall:
        for hook in self._by_point["unet_inputs"]:
            call = hook.unet_inputs(state, call)
        return call

    def residuals(self, state: StepState, call: UNetCall) -> dict:
        """The hooks' residuals summed into the UNet's keyword arguments ({} when none gives any)."""
        down, mid = None, None
        blocks: dict = {}
        for hook in self._by_point["residuals"]:
            extra = hook.residuals(state, call)
            if not extra:
                continue
            d, m = extra.get("down_block_additional_residuals"), extra.get("mid_block_additional_residual")
            if d is not None:
                down = tuple(d) if down is None else tuple(a + b for a, b in zip(down, d))
            if m is not None:
                mid = m if mid is None else mid + m
            for key in BLOCK_RESIDUAL_KEYS:
                if extra.get(key) is not None:
                    blocks[key] = extra[key] if key not in blocks else add_block_residuals(blocks[key], extra[key])
        out = dict(blocks)
        if down is not None:
            out["down_block_additional_residuals"] = down
        if mid is not None:
            out["mid_block_additional_residual"] = mid
        return out

    def combine_cfg(self, state: StepState, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        combined = uncond + (cond - uncond) * scale
        for hook in self._by_point["combine_cfg"]:
            combined = hook.combine_cfg(state, cond, uncond, scale, combined)
        return combined

    def after_denoise(self, state: StepState, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        for hook in self._by_point["after_denoise"]:
            denoised = hook.after_denoise(state, x, denoised)
        return denoised

    def after_step(self, state: StepState, x: torch.Tensor, denoised: torch.Tensor | None) -> None:
        for hook in self._by_point["after_step"]:
            hook.after_step(state, x, denoised)

    def after_sampling(self, state: StepState, latents: torch.Tensor) -> torch.Tensor:
        for hook in self._by_point["after_sampling"]:
            latents = hook.after_sampling(state, latents)
        return latents

    def after_decode(self, state: StepState, images: list[Image.Image]) -> list[Image.Image]:
        for hook in self._by_point["after_decode"]:
            images = hook.after_decode(state, images)
        return images
