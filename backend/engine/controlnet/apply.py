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
"""
from __future__ import annotations

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

    def scales(self, n: int, hires: bool) -> list[float]:
        if self.control_mode != "Balanced" or hires:
            return [self.weight * SOFT_INJECTION_BASE ** float(n - 1 - i) for i in range(n)]
        return [self.weight] * n

    def cond_only(self) -> bool:
        return self.control_mode == "ControlNet is more important" or self.global_average_pooling


class ControlSet:
    """The job's active units; `residuals(...)` gives the UNet's extra keyword arguments for one call."""

    def __init__(self, controls: list[ActiveControl]):
        self.controls = controls
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
