"""Applying ControlNets at each sampling step: the residuals added to the UNet.

Before each UNet call the denoiser asks its hooks for residuals; ControlNet's hook (`script.py`)
asks the job's `ControlSet`. For every unit active at this step (step / steps between its guidance
start and end, and in this pass per its hires option) the ControlNet runs on the same input as the UNet (the first 4 channels for
inpainting UNets), text context and SDXL size embedding, with the control map at this pass's
size. Its 13 outputs (12 down + middle for SD 1.x/2.x; fewer for SDXL) are scaled and summed
over units, as sd-webui-controlnet does:

- weight: every output times the unit's weight (a weight of 0 skips the unit entirely);
- "My prompt is more important" ("soft injection"), and any unit in the hires. fix pass:
  output i of n times weight * 0.825 ** (n - 1 - i), so shallow outputs count least;
- "ControlNet is more important": soft injection plus control on the conditional half of the
  CFG batch only (the unconditional rows get none), which CFG then amplifies;
- shuffle models (global average pooling): outputs averaged over the image, conditional rows only.
When no unit is active the UNet runs exactly as without ControlNet.

FLUX.1 ControlNets (`ControlSet.flux_residuals`, `backend.engine.families.flux_controlnet`) run on the
transformer's call (packed latents, timestep, guidance, pooled and T5 text features, position ids) and give
`controlnet_block_samples` / `controlnet_single_block_samples`: every output times the unit's weight (no soft
injection: a transformer has no shallow-to-deep ladder of outputs); "ControlNet is more important" controls the
conditional rows only. Union models get the unit's control mode.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from backend.controlnet.units import fit_control_map

SOFT_INJECTION_BASE = 0.825


@dataclass
class ActiveControl:
    """One enabled unit, ready to run: its loaded model, its detected map and its settings."""

    index: int
    model: torch.nn.Module  # diffusers ControlNetModel, placed by the device policy
    detected_map: Image.Image
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    hr_option: str = "Both"
    global_average_pooling: bool = False
    image_like: bool = False
    hr_map: Image.Image | None = None  # the map for the hires. fix pass, when it differs
    hint_mask: Image.Image | None = None  # inpaint units: white where the hint is -1 (to be repainted)
    union_mode: int | None = None  # FLUX union ControlNets: the control mode (flux_controlnet.UNION_MODES)
    encode: Callable | None = None  # FLUX: pixels (1, 3, H, W) in [-1, 1] -> the flow VAE's shifted, scaled latents
    _hints: dict = field(default_factory=dict, repr=False)

    def active(self, step: int, total_steps: int, hires: bool) -> bool:
        if self.weight == 0 or self.guidance_start > self.guidance_end:
            return False
        if hires and self.hr_option == "Low res only":
            return False
        if not hires and self.hr_option == "High res only":
            return False
        fraction = step / max(1, total_steps)
        return self.guidance_start <= fraction <= self.guidance_end

    def hint(self, width: int, height: int, device, dtype, hires: bool) -> torch.Tensor:
        """The control map at the pass's size as a (1, 3, H, W) tensor in 0..1, -1 where an inpaint unit's
        mask is (cached per size)."""
        key = (width, height, str(device), dtype, hires)
        if key not in self._hints:
            source = self.hr_map if hires and self.hr_map is not None else self.detected_map
            fitted = fit_control_map(source, width, height, self.resize_mode, image_like=self.image_like)
            arr = np.asarray(fitted.convert("RGB"), dtype=np.float32) / 255.0
            if self.hint_mask is not None:
                mask = fit_control_map(self.hint_mask.convert("RGB"), width, height, self.resize_mode)
                arr[np.asarray(mask)[..., 0] > 127] = -1.0
            self._hints[key] = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)
        return self._hints[key]

    def flux_control(self, width: int, height: int, device, dtype, hires: bool) -> torch.Tensor:
        """The control image as this FLUX ControlNet reads it at the pass's size (cached per size)."""
        from backend.engine.families.flux_controlnet import control_input
        key = ("flux", width, height, str(device), dtype, hires)
        if key not in self._hints:
            hint = self.hint(width, height, device, torch.float32, hires)
            self._hints[key] = control_input(self.model, hint, self.encode).to(device=device, dtype=dtype)
        return self._hints[key]

    def scales(self, n: int, hires: bool) -> list[float]:
        if self.control_mode != "Balanced" or hires:
            return [self.weight * SOFT_INJECTION_BASE ** float(n - 1 - i) for i in range(n)]
        return [self.weight] * n

    def cond_only(self) -> bool:
        return self.control_mode == "ControlNet is more important" or self.global_average_pooling


class ControlSet:
    """The job's active units; `residuals(...)` gives the UNet's extra keyword arguments for one call."""

    def __init__(self, controls: list[ActiveControl], *, family: str = "sd1",
                 transformer_blocks: tuple[int, int] | None = None, out_dtype: torch.dtype | None = None):
        self.controls = controls
        self.family = family  # the checkpoint's: "flux" runs `flux_residuals`
        self.transformer_blocks = transformer_blocks  # FLUX: the transformer's (double, single) block counts
        self.out_dtype = out_dtype  # FLUX: the dtype the transformer adds the residuals in
        self.calls = 0  # ControlNet forward passes run (all units)

    def __bool__(self) -> bool:
        return bool(self.controls)

    @torch.no_grad()
    def residuals(self, *, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  added_cond_kwargs: dict | None, cond_mask: torch.Tensor | None, step: int, total_steps: int,
                  width: int, height: int, hires: bool = False) -> dict:
        """{"down_block_additional_residuals", "mid_block_additional_residual"}, or {} when no unit applies."""
        total: list[torch.Tensor] | None = None
        for c in self.controls:
            if not c.active(step, total_steps, hires):
                continue
            dtype = next(c.model.parameters()).dtype
            in_ch = int(c.model.config.in_channels)
            x = sample[:, :in_ch]
            hint = c.hint(width, height, sample.device, dtype, hires).expand(x.shape[0], -1, -1, -1)
            kwargs = {}
            if added_cond_kwargs is not None and c.model.config.addition_embed_type == "text_time":
                kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in added_cond_kwargs.items()}
            down, mid = c.model(x.to(dtype), timestep.to(dtype), encoder_hidden_states=context.to(dtype),
                                controlnet_cond=hint, return_dict=False, **kwargs)
            self.calls += 1
            outs = list(down) + [mid]
            scales = c.scales(len(outs), hires)
            outs = [o * s for o, s in zip(outs, scales)]
            if c.global_average_pooling:
                outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
            if c.cond_only():
                mask = cond_mask if cond_mask is not None else torch.ones(x.shape[0], device=x.device)
                outs = [o * mask.to(o.dtype)[:, None, None, None] for o in outs]
            total = outs if total is None else [t + o for t, o in zip(total, outs)]
        if total is None:
            return {}
        return {"down_block_additional_residuals": tuple(total[:-1]), "mid_block_additional_residual": total[-1]}

    @torch.no_grad()
    def flux_residuals(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, img_ids: torch.Tensor,
                       txt_ids: torch.Tensor, guidance: torch.Tensor | None, cond_mask: torch.Tensor | None, step: int,
                       total_steps: int, width: int, height: int, hires: bool = False) -> dict:
        """{"controlnet_block_samples", "controlnet_single_block_samples"} summed over the active units for one
        FLUX transformer call, or {} when no unit applies."""
        from backend.engine.families.flux_controlnet import flux_controlnet_residuals
        from backend.engine.sampling_hooks import add_block_residuals

        layers, singles = self.transformer_blocks
        total: dict = {}
        for c in self.controls:
            if not c.active(step, total_steps, hires):
                continue
            dtype = next(c.model.parameters()).dtype
            control = c.flux_control(width, height, hidden_states.device, dtype, hires)
            mask = None
            if c.cond_only():
                mask = cond_mask if cond_mask is not None else torch.ones(hidden_states.shape[0])
            out = flux_controlnet_residuals(
                c.model, control, hidden_states=hidden_states, timestep=timestep,
                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, img_ids=img_ids,
                txt_ids=txt_ids, guidance=guidance, mode=c.union_mode, weight=c.weight, row_mask=mask,
                transformer_layers=layers, transformer_single_layers=singles, out_dtype=self.out_dtype)
            self.calls += 1
            for key, value in out.items():
                total[key] = value if key not in total else add_block_residuals(total[key], value)
        return total


def flux_call_inputs(call, width: int, height: int) -> dict:
    """The FLUX transformer call's inputs from a hook's `UNetCall`: `sample` the packed latents (B, tokens, 64)
    (or unpacked (B, 16, h, w), packed here), `timestep` as the transformer gets it, `context` the T5 features;
    `pooled_projections`, `guidance`, `img_ids`, `txt_ids` under those names in `call.extra` (or in
    `added_cond_kwargs`); position ids absent are FLUX's (zeros for text, (0, row, column) per 2x2 patch)."""
    from backend.engine.families.flux_controlnet import image_ids, pack_latents

    def find(name):
        if call.extra.get(name) is not None:
            return call.extra[name]
        return (call.added_cond_kwargs or {}).get(name)

    x = call.sample
    if x.ndim == 4:
        h, w = x.shape[-2:]
        x = pack_latents(x)
    else:
        h, w = height // 8, width // 8
    pooled = find("pooled_projections")
    if pooled is None:
        raise ValueError("the FLUX model call carries no pooled_projections for the ControlNet")
    img_ids, txt_ids = find("img_ids"), find("txt_ids")
    if img_ids is None:
        img_ids = image_ids(h, w, device=x.device)
    if txt_ids is None:
        txt_ids = torch.zeros(call.context.shape[1], 3, device=x.device)
    return {"hidden_states": x, "timestep": call.timestep, "encoder_hidden_states": call.context,
            "pooled_projections": pooled, "guidance": find("guidance"), "img_ids": img_ids, "txt_ids": txt_ids}
