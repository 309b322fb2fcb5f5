"""Sampling a flow-matching model (FLUX.1, Stable Diffusion 3) with the k-diffusion samplers (engine: torch).

The flow: a latent at noise level sigma in [0, 1] is ``x = (1 - sigma) * x0 + sigma * noise``; the transformer
predicts the velocity ``v = noise - x0``, so the denoised prediction is ``x0 = x - sigma * v``. With that,
``(x - x0) / sigma == v`` is the flow's ODE derivative in sigma, the same equation the k-diffusion samplers
integrate, so the deterministic samplers (Euler, Heun, LMS, DPM2, DPM++ 2M, UniPC, ...) run on the flow's sigmas
unchanged, as Forge and ComfyUI run them.

The samplers that add fresh noise (ancestral, SDE, LCM, Restart, DPM fast/adaptive and DDIM with eta > 0, churn)
add it as ``x0 + sigma * noise`` expects. They run in that form through an exact change of variables
(`in_noise_space`): ``x_ve = x / (1 - sigma)`` is ``x0 + sigma_ve * noise`` with ``sigma_ve = sigma / (1 - sigma)``,
so they see an ordinary variance-exploding model and keep their math; the model is called back on the flow.
Pure noise (sigma 1) has no finite sigma_ve: such a schedule starts at `FLOW_TOP_SIGMA` instead (the noise
latent is the same, the image's share at 0.999 is below what float32 resolves next to the noise).

`FlowModelCall` is the model call of `backend.engine.pipelines.common.CFGDenoiser` for these models: FLUX's
2x2 patch packing and position ids (as diffusers' FluxPipeline builds them), its distilled guidance input, SD3's
timestep (sigma * 1000) and optional skip-layer guidance.

Guidance: real CFG is the request's `cfg_scale` as given, for every family (at 1 the negative prompt's pass is
skipped: one transformer call per model call). FLUX.1 is distilled to run at CFG 1 (Forge's FLUX preset); the API's
default stays A1111's 7 (Forge's API too), so an API client sends `cfg_scale: 1` for FLUX, as in Forge. FLUX dev's
own guidance is the "Distilled CFG Scale" (`distilled_cfg_scale`, default 3.5), an input of the transformer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from backend.core.errors import UserError
from backend.engine.sampling_hooks import BLOCK_RESIDUAL_KEYS, UNetCall

__all__ = ["pack_latents", "unpack_latents", "flux_image_ids", "FlowModelCall", "SkipLayerGuidance",
           "skip_layer_guidance", "infotext_entries",
           "in_noise_space", "flow_sample_fn", "draws_noise", "FLOW_TOP_SIGMA"]

FLOW_TOP_SIGMA = 0.999


# ---------------------------------------------------------------------------
# FLUX's packed latents
# ---------------------------------------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, H/2 * W/2, C * 4]: each 2x2 patch one token (FLUX's input)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of `height` x `width` (even)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[H/2 * W/2, 3] position ids of the packed tokens: (0, row, column), as diffusers' FluxPipeline."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    """The transformers see 2x2 patches: an odd latent edge is padded by repeating the last row/column."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


# ---------------------------------------------------------------------------
# The model call
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD3's skip-layer guidance (SD 3.5's "SLG"): between `start` and `end` (fractions of the steps), the
    prediction is pushed away from the transformer's prediction without `layers`:
    ``denoised += (cond - cond_without_layers) * scale``. Defaults as SAI recommends for SD 3.5 Medium."""

    scale: float = 0.0
    layers: tuple[int, ...] = (7, 8, 9)
    start: float = 0.01
    end: float = 0.2

    def active(self, fraction: float) -> bool:
        return self.scale != 0 and self.start <= fraction <= self.end


def skip_layer_guidance(options) -> SkipLayerGuidance | None:
    """The job's SD3 skip-layer guidance from its settings (`sd3_slg_scale`, `_layers`, `_start`, `_end`); None when
    the scale is 0."""
    scale = float(options["sd3_slg_scale"])
    if scale == 0:
        return None
    text = str(options["sd3_slg_layers"])
    try:
        layers = tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise UserError(f"SD3 skip-layer guidance layers {text!r}: give the transformer blocks to skip as numbers "
                        "from 0, separated by commas (SAI's choice for SD 3.5 Medium: 7, 8, 9).")
    return SkipLayerGuidance(scale=scale, layers=layers, start=float(options["sd3_slg_start"]),
                             end=float(options["sd3_slg_end"]))


def infotext_entries(slg: SkipLayerGuidance | None) -> dict[str, object]:
    """The infotext entries of skip-layer guidance in use (read back into the settings on paste)."""
    if slg is None:
        return {}
    number = lambda v: int(v) if float(v).is_integer() else v  # noqa: E731
    return {"SLG scale": number(slg.scale), "SLG layers": ", ".join(str(n) for n in slg.layers),
            "SLG start": number(slg.start), "SLG end": number(slg.end)}


class FlowModelCall:
    """One transformer evaluation of a flow model -> the denoised prediction x0 = x - sigma * v.

    The sampling hooks see it as a `UNetCall`: `sample` the latent [B, 16, H, W], `timestep` what the transformer
    is given, `context` the text states, `added_cond_kwargs` {"pooled_projections", and for FLUX dev "guidance"}.
    Hooks that add UNet residuals (an SD ControlNet) have nothing to add them to: refused; a FLUX ControlNet's
    per-block residuals (`sampling_hooks.BLOCK_RESIDUAL_KEYS`) go to the FLUX transformer as its keyword arguments."""

    def __init__(self, model, schedule, distilled_cfg_scale: float = 3.5,
                 skip_layer_guidance: SkipLayerGuidance | None = None):
        self.model = model
        self.schedule = schedule
        self.family = model.family
        self.guidance = float(distilled_cfg_scale) if getattr(model, "guidance_embeds", False) else None
        self.slg = skip_layer_guidance if self.family == "sd3" else None
        self.pending_push: torch.Tensor | None = None
        if self.slg is not None:
            blocks = len(getattr(model.transformer, "transformer_blocks", ()))
            if blocks and max(self.slg.layers) >= blocks:
                raise UserError(f"SD3 skip-layer guidance layers {', '.join(map(str, self.slg.layers))}: this model "
                                f"has transformer blocks 0 to {blocks - 1}.")

    def __call__(self, hooks, state, x_in: torch.Tensor, sigma_in: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor | None, cond_mask: torch.Tensor | None, dtype) -> torch.Tensor:
        added = {"pooled_projections": pooled}
        if self.guidance is not None:
            added["guidance"] = torch.full((x_in.shape[0],), self.guidance, device=x_in.device)
        call = UNetCall(sample=x_in, timestep=self.schedule.model_timestep(sigma_in), context=context,
                        added_cond_kwargs=added, cond_mask=cond_mask)
        if hooks:
            call = hooks.unet_inputs(state, call)
            residuals = hooks.residuals(state, call)
            if residuals:
                if self.family != "flux" or not set(residuals) <= set(BLOCK_RESIDUAL_KEYS):
                    raise UserError("ControlNet models for SD 1.x/SDXL cannot guide a FLUX or SD3 model: choose a "
                                    "ControlNet made for this model's family, or turn ControlNet off.")
                # a FLUX ControlNet's per-block residuals: the transformer's own keyword arguments
                call = call.with_changes(extra={**call.extra, **residuals})
        velocity = self.velocity(call, dtype)
        denoised = x_in - velocity * sigma_in[:, None, None, None]
        if self.slg is not None and self.slg.active(state.fraction):
            rows = cond_mask > 0 if cond_mask is not None else torch.ones(x_in.shape[0], dtype=torch.bool,
                                                                          device=x_in.device)
            sub = call.with_changes(sample=call.sample[rows], timestep=call.timestep[rows], context=call.context[rows],
                                    added_cond_kwargs={k: v[rows] for k, v in call.added_cond_kwargs.items()},
                                    cond_mask=None)
            skipped = x_in[rows] - self.velocity(sub, dtype, skip_layers=list(self.slg.layers)) \
                * sigma_in[rows][:, None, None, None]
            # added to the guided result (after CFG, as SAI's pipeline does): `take_push`
            self.pending_push = (denoised[rows] - skipped) * self.slg.scale
        return denoised

    def take_push(self, guided: torch.Tensor) -> torch.Tensor:
        """The guided prediction of the conditional rows plus the skip-layer push of the last call (if any)."""
        push, self.pending_push = self.pending_push, None
        return guided if push is None else guided + push

    def velocity(self, call: UNetCall, dtype, skip_layers: Sequence[int] | None = None) -> torch.Tensor:
        x = call.sample
        h, w = x.shape[-2:]
        x = _pad_even(x)
        kwargs = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in (call.added_cond_kwargs or {}).items()}
        kwargs.update(call.extra)
        transformer = self.model.transformer
        context = call.context.to(dtype)
        if self.family == "flux":
            ph, pw = x.shape[-2:]
            out = transformer(hidden_states=pack_latents(x).to(dtype), encoder_hidden_states=context,
                              timestep=call.timestep.to(dtype),
                              img_ids=flux_image_ids(ph, pw, device=x.device, dtype=dtype),
                              txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype),
                              return_dict=False, **kwargs)[0]
            out = unpack_latents(out.float(), ph, pw)
        else:
            if skip_layers:
                kwargs["skip_layers"] = list(skip_layers)
            out = transformer(hidden_states=x.to(dtype), encoder_hidden_states=context,
                              timestep=call.timestep.to(dtype), return_dict=False, **kwargs)[0].float()
        return out[..., :h, :w]


# ---------------------------------------------------------------------------
# Samplers that add noise
# ---------------------------------------------------------------------------

def draws_noise(sampler_info, extra: dict) -> bool:
    """Whether the sampler adds fresh noise with these arguments (then it runs `in_noise_space`)."""
    name = sampler_info.name
    if "s_churn" in extra and float(extra["s_churn"]) > 0:  # the sampler's arguments (not the settings)
        return True
    if name in ("LCM", "Restart"):
        return True
    return bool(sampler_info.uses_noise) and float(extra.get("eta", 1.0)) != 0


def in_noise_space(sample_fn: Callable) -> Callable:
    """`sample_fn` (written for x = x0 + sigma * noise) run on a flow model through the change of variables
    x_ve = x / (1 - sigma), sigma_ve = sigma / (1 - sigma); it takes and returns flow latents and flow sigmas, and
    its denoiser, noise sampler and callback see flow sigmas and latents."""

    def to_ve(s: float) -> float:
        return s / (1.0 - s)

    def to_flow(s_ve: float) -> float:
        return s_ve / (1.0 + s_ve)

    def run(model, x, sigmas, *, noise_sampler=None, callback=None, **kwargs):
        flow = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).clamp(0, FLOW_TOP_SIGMA)
        ve = flow / (1 - flow)
        x_ve = x / (1 - float(flow[0]))
        ve_list = ve.tolist()

        def denoiser(x_v: torch.Tensor, sigma_v: torch.Tensor) -> torch.Tensor:
            s_ve = sigma_v.to(torch.float64)
            scale = (1.0 / (1.0 + s_ve)).to(x_v.dtype)[:, None, None, None]
            return model(x_v * scale, (s_ve / (1.0 + s_ve)).to(sigma_v.dtype))

        def noise(s_v: float, sn_v: float) -> torch.Tensor:
            if noise_sampler is None:
                return torch.randn_like(x)
            return noise_sampler(to_flow(s_v), to_flow(sn_v))

        def report(d: dict) -> None:
            i = d["i"]
            s_next = ve_list[min(i + 1, len(ve_list) - 1)]
            callback({**d, "x": d["x"] / (1.0 + s_next), "sigma": to_flow(float(d["sigma"])),
                      "sigma_hat": to_flow(float(d.get("sigma_hat", d["sigma"])))})

        out = sample_fn(denoiser, x_ve, ve.to(torch.float32) if torch.is_tensor(sigmas) else ve_list,
                        noise_sampler=noise, callback=report if callback is not None else None, **kwargs)
        return out / (1.0 + ve_list[-1])

    run.__name__ = f"{getattr(sample_fn, '__name__', 'sample')}_on_flow"
    run.__doc__ = f"{sample_fn.__doc__ or ''} (On a flow model, through the change of variables to x0 + sigma*noise.)"
    return run


def flow_sample_fn(sampler_info, extra: dict) -> Callable:
    """The sample function for a flow model: the sampler's own when it is deterministic with these arguments,
    else the sampler `in_noise_space`."""
    fn = sampler_info.sample_fn
    return in_noise_space(fn) if draws_noise(sampler_info, extra) else fn
