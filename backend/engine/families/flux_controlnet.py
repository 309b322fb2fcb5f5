"""FLUX.1 ControlNets: loading InstantX / Shakker-Labs (union) and XLabs files, and computing their residuals.

All three run as diffusers' `FluxControlNetModel` (what the files are is `backend.controlnet.model_files`):
- InstantX / Shakker-Labs files are already in its layout. They read the control image as FLUX latents: the
  picture in [-1, 1] encoded by the flow VAE, `(mean - shift_factor) * scaling_factor`, packed in 2x2 patches
  like the transformer's input (as diffusers' FluxControlNetPipeline prepares it). Union models take a control
  mode number (`UNION_MODES`, the table of InstantX's and Shakker-Labs' union models), embedded as an extra text
  token.
- XLabs files (x-flux) are a small FLUX in Black Forest Labs' names with a convolutional hint encoder reading the
  picture's pixels in [-1, 1] (three stride-2 convolutions: 1/8 of the size, then 2x2 patches). Renamed here to
  `FluxControlNetModel` with `conditioning_embedding_channels=16` and `patch_size=2`, whose hint encoder is the
  same network.

The outputs go to the transformer's `controlnet_block_samples` / `controlnet_single_block_samples`. Their
mapping onto the transformer's blocks differs: InstantX's k outputs each cover ceil(N / k) consecutive blocks,
XLabs' repeat (block i takes output i mod k, as x-flux adds them). `flux_controlnet_residuals` returns them as
`BlockResiduals` with one entry per transformer block, so units of both kinds sum block by block.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from backend.core.errors import UserError
from backend.engine.families.flux import BFL_RENAMES, BflRenamer, rope_axes
from backend.engine.sampling_hooks import BlockResiduals

# The control mode numbers of the FLUX union ControlNets (InstantX/FLUX.1-dev-Controlnet-Union and
# Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro share them), by Easel's preprocessor.
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "low quality": 6}
_PREPROCESSOR_MODES = {"canny": "canny", "tile_resample": "tile", "depth_anything": "depth",
                       "blur_gaussian": "blur", "openpose": "pose"}
_CONTROL_TYPE_MODES = {"Canny": "canny", "Depth": "depth", "OpenPose": "pose", "Tile": "tile"}

XLABS_HINT_CONVS = 8  # x-flux's input_hint_block: Conv2d at indices 0, 2, ..., 14 (SiLUs between)


def union_mode(preprocessor: str, control_type: str) -> int | None:
    """The union control mode for a unit's preprocessor (None when it has none in the table)."""
    name = _PREPROCESSOR_MODES.get(preprocessor) or _CONTROL_TYPE_MODES.get(control_type)
    return UNION_MODES[name] if name else None


# -- loading ---------------------------------------------------------------------------------------
def xlabs_to_diffusers(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An XLabs (x-flux) ControlNet's tensors renamed to `FluxControlNetModel`'s; leftovers give a UserError."""
    sd = dict(sd)
    r = BflRenamer(sd, "XLabs FLUX ControlNet")
    inner = config["attention_head_dim"] * config["num_attention_heads"]
    for src, dst in BFL_RENAMES:
        if src.startswith("final_layer") or (src.startswith("guidance_in") and not config["guidance_embeds"]):
            continue
        r.move_module(src, dst)
    for i in range(config["num_layers"]):
        r.double_block(i, inner)
        r.move_module(f"controlnet_blocks.{i}", f"controlnet_blocks.{i}")
    r.move_module("pos_embed_input", "controlnet_x_embedder")
    hint = ["conv_in"] + [f"blocks.{j}" for j in range(XLABS_HINT_CONVS - 2)] + ["conv_out"]
    for j, name in enumerate(hint):
        r.move_module(f"input_hint_block.{2 * j}", f"input_hint_block.{name}")
    if sd:
        from backend.engine.model_loader import few_names
        raise UserError(f"The XLabs FLUX ControlNet holds {len(sd)} tensors of no known part: {few_names(sd)}.")
    return r.out


def load_flux_controlnet(sd: dict[str, torch.Tensor], info, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu"):
    """A diffusers `FluxControlNetModel` from a FLUX ControlNet file's tensors (`info`: its `ControlNetInfo`)."""
    from diffusers import FluxControlNetModel

    from backend.engine.model_loader import build_without_weights, load_weights

    config = {**info.config, "axes_dims_rope": list(rope_axes(info.config["attention_head_dim"]))}
    weights = xlabs_to_diffusers(sd, config) if info.layout == "xlabs" else sd
    model = build_without_weights(lambda: FluxControlNetModel(**config))
    load_weights(model, weights, "FLUX ControlNet", dtype=dtype, device=device)
    return model.eval()


# -- inputs ----------------------------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> FLUX's token sequence (B, H/2 * W/2, C * 4), channels then the 2x2 patch."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX's position ids of the image tokens for a (latent_height, latent_width) latent: (tokens, 3) of
    (0, row, column) per 2x2 patch."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def control_input(controlnet, hint: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """The control image as the ControlNet reads it, from `hint` (1, 3, H, W) in 0..1: XLabs the pixels in
    [-1, 1]; InstantX / Shakker-Labs the packed latents `encode` gives for the pixels in [-1, 1] (the flow VAE's
    mean, shifted and scaled)."""
    pixels = hint * 2.0 - 1.0
    if controlnet.input_hint_block is not None:
        return pixels
    if encode is None:
        raise UserError("This FLUX ControlNet reads the control image as latents, and the checkpoint has no VAE.")
    return pack_latents(encode(pixels))


# -- running ---------------------------------------------------------------------------------------
@torch.no_grad()
def flux_controlnet_residuals(controlnet, control: torch.Tensor, *, hidden_states: torch.Tensor,
                              timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              pooled_projections: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor,
                              guidance: torch.Tensor | None = None, mode: int | None = None, weight: float = 1.0,
                              row_mask: torch.Tensor | None = None, transformer_layers: int,
                              transformer_single_layers: int, out_dtype: torch.dtype | None = None) -> dict:
    """The residual keyword arguments of `FluxTransformer2DModel.forward` from one ControlNet.

    `control`: from `control_input` (one row, repeated over the batch); the other inputs are the transformer
    call's (packed `hidden_states` (B, tokens, 64), `timestep` as the transformer gets it, `guidance` for dev);
    `mode`: a union model's control mode (required for union models, ignored otherwise); `row_mask` (B,): rows
    to control (1) or not (0). Returns {"controlnet_block_samples": BlockResiduals, and
    "controlnet_single_block_samples" when the ControlNet has single blocks}, one entry per transformer block.
    """
    dtype = next(controlnet.parameters()).dtype
    batch = hidden_states.shape[0]
    kwargs = {}
    if controlnet.union:
        if mode is None:
            raise UserError("A FLUX union ControlNet needs a control mode (canny, tile, depth, blur, pose, gray).")
        if not 0 <= mode < controlnet.config.num_mode:
            raise UserError(f"Control mode {mode} is out of this union ControlNet's range (0-{controlnet.config.num_mode - 1}).")
        kwargs["controlnet_mode"] = torch.full((batch, 1), int(mode), dtype=torch.long, device=hidden_states.device)
    if guidance is not None and controlnet.config.guidance_embeds:
        kwargs["guidance"] = guidance.to(dtype)
    cond = control.to(device=hidden_states.device, dtype=dtype)
    cond = cond.expand(batch, *cond.shape[1:])
    blocks, singles = controlnet(hidden_states.to(dtype), controlnet_cond=cond, conditioning_scale=1.0,
                                 encoder_hidden_states=encoder_hidden_states.to(dtype),
                                 pooled_projections=pooled_projections.to(dtype), timestep=timestep.to(dtype),
                                 img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kwargs)
    scale = torch.full((batch,), float(weight), device=hidden_states.device, dtype=dtype)
    if row_mask is not None:
        scale = scale * row_mask.to(scale)
    scale = scale[:, None, None]

    def scaled(samples):
        return [s * scale if out_dtype is None else (s * scale).to(out_dtype) for s in samples]

    repeat = controlnet.input_hint_block is not None  # XLabs: outputs repeat over the blocks, as x-flux adds them
    out = {"controlnet_block_samples": BlockResiduals.spread(scaled(blocks), transformer_layers, repeat=repeat)}
    if singles:
        out["controlnet_single_block_samples"] = BlockResiduals.spread(scaled(singles), transformer_single_layers)
    return out
