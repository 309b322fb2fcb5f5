"""The backend side of ControlNet: the model cache and turning a job's units into a `ControlSet`.

Runs in the backend process: loads the units' models (kept in an LRU cache like checkpoints,
placed by the device policy beside the UNet), runs the preprocessors on the control images,
checks each model fits the loaded checkpoint, records the infotext, and returns a `ControlSet`
(`script.py` wraps it in the sampling hook the pipelines' denoisers run). Units that cannot apply (a model for another model
family, a start after the end) are skipped with a warning; the others go on.
"""
from __future__ import annotations

import io
import logging
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from backend.core.errors import JobInterrupted, UserError
from backend.core.unet_layout import FAMILY_NAMES
from backend.engine.controlnet.apply import ActiveControl, ControlSet
from backend.controlnet.model_files import detect_controlnet
from backend.core.tensor_headers import read_shapes
from backend.engine.controlnet.model_files import load_controlnet
from backend.core.preprocessor_catalog import find_preprocessor
from backend.engine.controlnet.preprocessors import run_preprocessor
from backend.controlnet.units import UnitJob, check_unit, pixel_perfect_resolution, unit_infotext

log = logging.getLogger("easel.controlnet")


class ControlNetCache:
    """Loaded ControlNets by file, least recently used evicted past the limit; unused ones leave the device.

    The ControlNets in use are companions of one checkpoint (`LoadedModel.companions`), placed beside its
    UNet; the cache remembers which (weakly: an evicted checkpoint is not kept alive, and its release took
    its companions off the device). Placing beside another checkpoint first releases them from the previous one.
    """

    def __init__(self, policy):
        self.policy = policy
        self.models: OrderedDict[tuple, tuple] = OrderedDict()
        self.loads = 0
        self._infos: dict[tuple, object] = {}
        self._owner: weakref.ref | None = None  # the LoadedModel the ControlNets are placed beside

    def owner(self):
        """The checkpoint (LoadedModel) the placed ControlNets run beside, or None."""
        return self._owner() if self._owner is not None else None

    def place_beside(self, module, loaded) -> None:
        """Place a ControlNet beside `loaded`'s UNet (its companion), released from any other checkpoint first."""
        previous = self.owner()
        if previous is not None and previous is not loaded:
            for companion in list(previous.companions.values()):
                self.policy.release_beside(companion.module, previous)
        self._owner = weakref.ref(loaded)
        self.policy.place_beside(module, loaded)

    def _release(self, module) -> None:
        owner = self.owner()
        if owner is not None and owner.companion(module) is not None:
            self.policy.release_beside(module, owner)

    def info(self, path: Path):
        """What the file is (family, config), read from its header without loading it (remembered per file)."""
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime)
        if key not in self._infos:
            try:
                self._infos[key] = detect_controlnet(read_shapes(Path(path)))
            except UserError as exc:
                raise UserError(f"{Path(path).name}: {exc.message}", status=exc.status) from exc
        return self._infos[key]

    def get(self, path: Path, sd_model, limit: int):
        st = Path(path).stat()
        time_dim = getattr(sd_model.unet.config, "addition_time_embed_dim", None)
        key = (str(path), st.st_size, st.st_mtime, time_dim)
        if key in self.models:
            self.models.move_to_end(key)
        else:
            t0 = time.perf_counter()
            self.models[key] = load_controlnet(Path(path), dtype=self.policy.dtype, addition_time_embed_dim=time_dim)
            self.loads += 1
            log.info("loaded ControlNet %s (%s) in %.1f s", Path(path).name, self.models[key][1].family,
                     time.perf_counter() - t0)
        while len(self.models) > max(1, limit):
            _, (old, _info) = self.models.popitem(last=False)
            self._release(old)
        return self.models[key]

    def release_except(self, keep: list) -> None:
        ids = {id(m) for m in keep}
        for module, _info in self.models.values():
            if id(module) not in ids:
                self._release(module)

    def clear(self) -> None:
        for module, _info in self.models.values():
            self._release(module)
        self.models.clear()


def fits(info, sd_model) -> str | None:
    """Why a ControlNet cannot run with the loaded checkpoint, or None when it fits."""
    if info.family != sd_model.family:
        return (f"it is a {info.family_name} ControlNet and the loaded checkpoint is "
                f"{FAMILY_NAMES.get(sd_model.family, sd_model.family)}")
    if info.family == "flux":
        return _flux_fits(info.config, sd_model.unet.config)
    unet = sd_model.unet.config
    cfg = info.config
    if int(cfg["cross_attention_dim"]) != int(unet.cross_attention_dim):
        return f"its text-feature width ({cfg['cross_attention_dim']}) differs from the checkpoint's ({unet.cross_attention_dim})"
    if list(cfg["block_out_channels"]) != list(unet.block_out_channels) or int(cfg["layers_per_block"]) != int(
            unet.layers_per_block if isinstance(unet.layers_per_block, int) else unet.layers_per_block[0]):
        return "its block layout differs from the checkpoint's UNet"
    return None


def _flux_fits(cfg: dict, transformer) -> str | None:
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    own = int(transformer.num_attention_heads) * int(transformer.attention_head_dim)
    if width != own:
        return f"its width ({width}) differs from the FLUX transformer's ({own})"
    if int(cfg["in_channels"]) != int(transformer.in_channels):
        return f"its input channels ({cfg['in_channels']}) differ from the FLUX transformer's ({transformer.in_channels})"
    for key, what in (("joint_attention_dim", "text-feature width"), ("pooled_projection_dim", "pooled text width")):
        if int(cfg[key]) != int(getattr(transformer, key)):
            return f"its {what} ({cfg[key]}) differs from the FLUX transformer's ({getattr(transformer, key)})"
    if cfg["guidance_embeds"] and not transformer.guidance_embeds:
        return "it reads FLUX.1-dev's distilled guidance, which this checkpoint (FLUX.1-schnell) does not have"
    return None


def check_flux_pairing(info, model, what: str, title: str) -> None:
    """A FLUX ControlNet with a Stable Diffusion checkpoint, or the reverse, is a `UserError` naming both families."""
    if (info.family == "flux") != (model.family == "flux"):
        raise UserError(f"{what}: {title} is a {info.family_name} ControlNet and the loaded checkpoint is "
                        f"{FAMILY_NAMES.get(model.family, model.family)}. Choose a ControlNet made for "
                        f"{FAMILY_NAMES.get(model.family, model.family)}, or load a "
                        f"{info.family_name} checkpoint.")


def flux_encoder(model, device):
    """FLUX ControlNets' latent encoder for `model` (a FlowModel): pixels in [-1, 1] -> the flow VAE's mean,
    shifted and scaled as the transformer's latents are."""
    import torch

    @torch.no_grad()
    def encode(pixels):
        vae = model.vae
        dtype = next(vae.parameters()).dtype
        mean = vae.encode(pixels.to(device, dtype), return_dict=False)[0].mean.float()
        return (mean - float(model.vae_shift_factor)) * float(model.vae_scale_factor)
    return encode


def union_mode_for(info, pre, what: str, title: str) -> int | None:
    """A FLUX union ControlNet's control mode from the unit's preprocessor (None for other ControlNets)."""
    if info.family != "flux" or not info.union:
        return None
    from backend.engine.families.flux_controlnet import UNION_MODES, union_mode
    mode = union_mode(pre.name, pre.control_type)
    if mode is None:
        raise UserError(f"{what}: {title} is a FLUX union ControlNet, which must be told the control type; the "
                        f"preprocessor {pre.name!r} names none of its types. Choose a canny, depth_anything, "
                        f"tile_resample, blur_gaussian or openpose preprocessor (types: "
                        f"{', '.join(f'{k} {v}' for k, v in UNION_MODES.items())}).")
    if mode >= int(info.config["num_mode"]):
        raise UserError(f"{what}: {title} has {info.config['num_mode']} control modes; {pre.control_type} "
                        f"(mode {mode}) is not among them.")
    return mode


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def prepare_controls(unit_jobs: list[UnitJob], ctx, cache: ControlNetCache, *, width: int, height: int,
                     hires_size: tuple[int, int] | None = None, init_image: Image.Image | None = None,
                     init_mask: Image.Image | None = None, seed: int = 0,
                     annotator_env=None) -> tuple[ControlSet | None, list[bytes]]:
    """Load, preprocess and check the enabled units; returns (ControlSet or None, detected maps as PNG).

    `init_image`/`init_mask`: img2img's picture and inpaint mask (white = repaint, already inverted for
    "Inpaint not masked"), used by units without an image of their own.
    """
    model = ctx.model
    limit = int(ctx.options["control_net_model_cache_size"])
    active: list[ActiveControl] = []
    maps: list[bytes] = []
    used_models = []
    stop = getattr(getattr(ctx, "control", None), "interrupted", None)
    for number, job in enumerate(unit_jobs):
        if stop is not None and stop():  # Interrupt between units (preprocessors can take long)
            raise JobInterrupted()
        unit = job.unit
        what = f"ControlNet unit {number}"
        warnings = check_unit(unit, number)
        pre = find_preprocessor(unit.module)
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise UserError(f"{what} is enabled but has no control image. Upload one"
                            + (" (in img2img, leave it empty to use the img2img image)." if init_image is None else "."))
        image = image.convert("RGBA") if "A" in image.getbands() else image.convert("RGB")

        res = unit.processor_res
        if unit.pixel_perfect:
            res = pixel_perfect_resolution(image.width, image.height, width, height, unit.resize_mode)
        d_res, d_a, d_b = pre.defaults()
        used_res = (res if res and res > 0 else d_res) if pre.resolution is not None else None
        used_a = (unit.threshold_a if unit.threshold_a != -1 else d_a) if pre.threshold_a is not None else None
        used_b = (unit.threshold_b if unit.threshold_b != -1 else d_b) if pre.threshold_b is not None else None
        ctx.extra_params[f"ControlNet {number}"] = unit_infotext(unit, job.model_title, pre.name, used_res, used_a, used_b)

        if warnings:
            ctx.warnings.extend(warnings)
            continue
        if unit.weight == 0:
            continue
        if job.model_path is None:
            ctx.warnings.append(f"{what}: no ControlNet model is chosen, so the unit does nothing.")
            continue
        reason = None
        check_flux_pairing(cache.info(Path(job.model_path)), model, what, job.model_title)
        if cache.info(Path(job.model_path)).family != model.family:
            reason = fits(cache.info(Path(job.model_path)), model)
        else:
            controlnet, info = cache.get(Path(job.model_path), model, limit)
            reason = fits(info, model)
        if reason:
            ctx.warnings.append(f"{what}: {job.model_title} does not fit this checkpoint: {reason}. The unit was skipped; "
                                f"choose a ControlNet made for {FAMILY_NAMES.get(model.family, model.family)}.")
            continue
        mode = union_mode_for(info, pre, what, job.model_title)
        hint_mask = None
        if pre.uses_mask:
            hint_mask = inpaint_mask_for(unit, image, init_mask if unit.image is None else None)
            if hint_mask is None:
                ctx.warnings.append(f"{what}: {pre.name} needs a mask (draw one on the control image, send the unit's "
                                    f"`mask`, or use it in img2img inpaint); the whole image was used as the hint.")
        detected = run_preprocessor(pre, image, res, unit.threshold_a, unit.threshold_b, seed=seed, env=annotator_env)
        hr_map = None
        if hires_size is not None and unit.pixel_perfect and pre.resolution is not None:
            if stop is not None and stop():
                raise JobInterrupted()
            hr_res = pixel_perfect_resolution(image.width, image.height, hires_size[0], hires_size[1], unit.resize_mode)
            hr_map = run_preprocessor(pre, image, hr_res, unit.threshold_a, unit.threshold_b, seed=seed, env=annotator_env)
        if pre.name != "none" and unit.save_detected_map and not ctx.options["control_net_no_detectmap"]:
            maps.append(_png(masked_preview(detected, hint_mask)))
        cache.place_beside(controlnet, ctx.loaded)
        used_models.append(controlnet)
        active.append(ActiveControl(
            index=number, model=controlnet, detected_map=detected, weight=unit.weight,
            guidance_start=unit.guidance_start, guidance_end=unit.guidance_end, control_mode=unit.control_mode,
            resize_mode=unit.resize_mode, hr_option=unit.hr_option if hires_size is not None else "Both",
            global_average_pooling=info.global_average_pooling, image_like=pre.image_like, hr_map=hr_map,
            hint_mask=hint_mask, union_mode=mode,
            encode=flux_encoder(model, ctx.policy.device) if model.family == "flux" else None))
    cache.release_except(used_models)
    if not active:
        return None, maps
    if model.family == "flux":
        config = model.unet.config
        return ControlSet(active, family="flux", transformer_blocks=(int(config.num_layers), int(config.num_single_layers)),
                          out_dtype=getattr(ctx.policy, "dtype", None)), maps
    return ControlSet(active, family=model.family), maps


def inpaint_mask_for(unit, image: Image.Image, init_mask: Image.Image | None) -> Image.Image | None:
    """The mask of an inpaint unit (L, white = repaint, at the image's size), as sd-webui-controlnet finds it:
    the unit's own mask, else img2img's inpaint mask (`init_mask`, given when the unit uses the img2img image),
    else the control image's transparent pixels; None: no mask."""
    mask = unit.mask if unit.mask is not None else init_mask
    if mask is None and "A" in image.getbands():
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 128:
            mask = Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    if mask is None:
        return None
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    binary = np.asarray(mask) > 127
    return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), "L") if binary.any() else None


def masked_preview(detected: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The detected map as shown to the user: an inpaint unit's masked pixels in black."""
    if mask is None:
        return detected
    arr = np.asarray(detected.convert("RGB")).copy()
    small = np.asarray(mask.resize(detected.size, Image.Resampling.NEAREST)) > 127
    arr[small] = 0
    return Image.fromarray(arr)

