"""Loading a single-file SD 1.x / 2.x / SDXL checkpoint into diffusers and transformers modules.

    read file -> detect architecture from shapes -> rename keys -> build empty modules
    (meta device) -> assign the tensors (no second copy in RAM) -> cast, eval, freeze

Nothing here touches the network: every config is built in code from the tensors'
shapes (`model_detection`), and the tokenizer comes from files generated out of the
BPE data that ships with open-clip-torch (`tokenizer`).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.engine.ldm_convert import convert_vae_ldm_to_diffusers, is_vae_attention_matrix, ldm_to_diffusers
from backend.engine.model_detection import FAMILY_NAMES, VAE_PREFIX, ModelSpec, detect_checkpoint, detect_vae
from backend.engine.state_dict_io import read_state_dict
from backend.engine.tokenizer import clip_tokenizer

log = logging.getLogger(__name__)


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns on every `.to(dtype)` that "modules should be kept in float32: []", even when the
    list is empty; our dtype changes are deliberate (the device policy's), so that empty warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08  # ComfyUI's stand-in for 0 (keeps sigma_max finite)


@dataclass
class SDModel:
    """A loaded checkpoint: its modules, tokenizers and what sampling needs to know about it.

    `text_encoders[i]` pairs with `tokenizers[i]`: CLIP-L with the "clip_l" tokenizer; SD2's
    OpenCLIP encoder and SDXL's second encoder (a `CLIPTextModelWithProjection`) with "clip_g".
    `vae_scale_factor` is the latent scaling factor (0.18215 or 0.13025), not the 8x size ratio.
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    prediction_type: str
    is_inpaint: bool
    alphas_cumprod: torch.Tensor
    vae_scale_factor: float
    spec: ModelSpec

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def text_encoder_hidden_sizes(self) -> list[int]:
        return [int(c["hidden_size"]) for c in self.spec.text_encoder_configs]

    @property
    def cross_attention_dim(self) -> int:
        return int(self.spec.unet_config["cross_attention_dim"])

    @property
    def latent_channels(self) -> int:
        return int(self.spec.vae_config["latent_channels"])

    @property
    def vae_downsample(self) -> int:
        return self.spec.vae_downsample


def sd_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """Stable Diffusion's training schedule: 'scaled_linear' betas 0.00085..0.012 over 1000 steps (float32).

    With `zero_terminal_snr` the schedule is rescaled so the last step is pure noise
    (Lin et al. 2023), its last value nudged above 0 as ComfyUI does.
    """
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        sqrt_ac = alphas_cumprod.sqrt()
        first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
        sqrt_ac = (sqrt_ac - last) * first / (first - last)
        alphas_cumprod = sqrt_ac ** 2
        alphas_cumprod[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return alphas_cumprod.to(torch.float32)


# -- module construction ------------------------------------------------------------------------
def build_unet(config: dict):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**config)


def build_vae(config: dict):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**config)


def build_text_encoder(config: dict, class_name: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cls = CLIPTextModelWithProjection if class_name == "CLIPTextModelWithProjection" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def build_without_weights(builder, *args):
    """Build a module with its parameters on the meta device (buffers stay real), without initialising them."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return builder(*args)


def _fit_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Adapt text-encoder names to the installed transformers (with or without the `text_model.` level)."""
    if not sd or set(sd) & expected:
        return sd
    if all(k.startswith("text_model.") for k in expected):
        return {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def few_names(names, n: int = 5) -> str:
    """The first `n` names in sorted order, joined for a message, with how many more there are."""
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def check_fit(given: dict, expected: dict, what: str, *, also_allowed=frozenset()) -> None:
    """Refuse (UserError) tensors `given` ({name: tensor or anything with a `.shape`}) that do not fit a module
    built empty whose tensors are `expected` ({name: shape}): names missing or unexpected (`also_allowed` may be
    there besides, unchecked), shapes that differ."""
    missing, unexpected = set(expected) - set(given), set(given) - set(expected) - set(also_allowed)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {few_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {few_names(unexpected)}")
        raise UserError(f"The {what} weights do not fit the detected architecture ({'; '.join(parts)}). "
                        "The file may be damaged or of an unsupported variant.")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in given.items()
           if k in expected and tuple(v.shape) != tuple(expected[k])]
    if bad:
        raise UserError(f"The {what} weights have unexpected shapes: {few_names(bad, 3)}. The file may be damaged.")


def load_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, *,
                 dtype: torch.dtype, device: str | torch.device) -> None:
    """Strictly put `sd` into `module` (built empty), cast to `dtype` on `device`; damage -> UserError."""
    expected_shapes = {k: v.shape for k, v in module.state_dict().items()}
    sd = _fit_prefix(sd, set(expected_shapes))
    check_fit(sd, expected_shapes, what)
    converted = {}
    for k in list(sd.keys()):
        v = sd.pop(k)
        if v.is_floating_point():
            v = v.to(device=device, dtype=dtype)
        else:
            v = v.to(device=device)
        converted[k] = v.contiguous()
    module.load_state_dict(converted, strict=True, assign=True)
    target = torch.device(device)
    for name, buf in module.named_buffers():  # non-persistent buffers were built real on the CPU
        if buf.device.type != target.type or (target.index is not None and buf.device.index != target.index):
            _set_buffer(module, name, buf.to(target))
    module.eval()
    module.requires_grad_(False)


def _set_buffer(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._buffers[leaf] = value


# -- prediction type ----------------------------------------------------------------------------
def prediction_type_from_yaml(checkpoint: Path) -> str | None:
    """`<checkpoint stem>.yaml` beside the file (A1111): `parameterization: "v"` -> v_prediction; None if no yaml."""
    yaml_path = checkpoint.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        raise UserError(f"{yaml_path.name} (the config beside the checkpoint) is not valid YAML: {e}") from e
    params = ((data or {}).get("model") or {}).get("params") or {} if isinstance(data, dict) else {}
    return "v_prediction" if str(params.get("parameterization", "eps")).strip().lower() == "v" else "epsilon"


@torch.no_grad()
def guess_v_prediction(unet: torch.nn.Module, cross_attention_dim: int, *, added_cond_kwargs: dict | None = None) -> bool:
    """A1111's empirical test for SD2 v-prediction models (`is_using_v_parameterization_for_sd2`).

    Run the UNet once on an all-0.5 8x8 latent at t=999 with all-0.5 text features
    (2 tokens) and look at mean(output - input). At t=999 the input is almost pure noise:
    an epsilon model predicts that noise, so the output stays near the input; a v model
    predicts v = alpha*eps - sigma*x0 with sigma ~ 1, which lands far below it. A1111 calls
    it v-prediction when the mean difference is below -1. Runs on the UNet's device in its
    dtype (the threshold is coarse); only if that dtype cannot run there is the UNet upcast.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    in_ch = unet.config.in_channels

    def run(run_dtype: torch.dtype) -> float:
        x = torch.full((1, in_ch, 8, 8), 0.5, device=device, dtype=run_dtype)
        context = torch.full((1, 2, cross_attention_dim), 0.5, device=device, dtype=run_dtype)
        t = torch.tensor([999], device=device)
        out = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return (out.float() - x[:, : out.shape[1]].float()).mean().item()

    try:
        value = run(dtype)
    except RuntimeError:  # e.g. an op without a float16 kernel on this device
        if dtype == torch.float32:
            raise
        unet.to(torch.float32)
        try:
            value = run(torch.float32)
        finally:
            unet.to(dtype)
    return value < -1


def _decide_prediction_type(path: Path, spec: ModelSpec, unet) -> str:
    from_yaml = prediction_type_from_yaml(path)
    if from_yaml is not None:
        return from_yaml
    if spec.prediction_type_known:
        return spec.prediction_type
    # SD2 without a yaml: A1111's heuristic (the 9-channel SD2 inpainting model is epsilon).
    if spec.unet_config["in_channels"] != spec.unet_config["out_channels"]:
        return "epsilon"
    return "v_prediction" if guess_v_prediction(unet, spec.unet_config["cross_attention_dim"]) else "epsilon"


# -- public API ---------------------------------------------------------------------------------
def load_sd_model(path: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  vae_path: Path | None = None, vae_dtype: torch.dtype | None = None,
                  text_dtype: torch.dtype | None = None) -> SDModel:
    """Load an SD 1.x / 2.x / SDXL single-file checkpoint (A1111 layout) from `path`.

    `vae_path` replaces the checkpoint's VAE with a standalone VAE file. `dtype` is the UNet's;
    `vae_dtype`/`text_dtype` (default: `dtype`) those of the VAE and text encoders, so a part kept in
    float32 is not rounded through a smaller type. Problems with the file raise `UserError` with a
    message for the user.
    """
    path = Path(path)
    vae_dtype = vae_dtype or dtype
    text_dtype = text_dtype or dtype
    state_dict = read_state_dict(path, exclude_prefixes=("model_ema.",))  # EMA copies are not used
    try:
        spec = detect_checkpoint(state_dict)
    except UserError as exc:
        raise UserError(f"{path.name}: {exc.message}", status=exc.status) from exc
    unknown: list[str] = []
    parts = ldm_to_diffusers(state_dict, spec, unknown=unknown)
    del state_dict
    if unknown:
        log.warning("%s: %d tensors matched no rule and are ignored: %s", path.name, len(unknown), few_names(unknown))
    name = FAMILY_NAMES[spec.family]

    unet = build_without_weights(build_unet, spec.unet_config)
    load_weights(unet, parts.pop("unet"), f"{name} UNet", dtype=dtype, device=device)
    vae = build_without_weights(build_vae, spec.vae_config)
    if vae_path is not None:
        parts.pop("vae")
        load_weights(vae, load_vae_file(vae_path), f"VAE ({Path(vae_path).name})", dtype=vae_dtype, device=device)
    else:
        load_weights(vae, parts.pop("vae"), f"{name} VAE", dtype=vae_dtype, device=device)

    text_encoders, tokenizers = [], []
    for index, (config, cls_name) in enumerate(zip(spec.text_encoder_configs, spec.text_encoder_classes)):
        key = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        encoder = build_without_weights(build_text_encoder, config, cls_name)
        load_weights(encoder, parts.pop(key), f"{name} text encoder {index + 1}", dtype=text_dtype, device=device)
        text_encoders.append(encoder)
        openclip = spec.text_encoder_layouts[index] == "openclip"
        tokenizers.append(clip_tokenizer("clip_g" if openclip else "clip_l"))
    del parts
    gc.collect()

    prediction_type = _decide_prediction_type(path, spec, unet)
    spec.prediction_type, spec.prediction_type_known = prediction_type, True
    return SDModel(
        family=spec.family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        prediction_type=prediction_type, is_inpaint=spec.is_inpaint,
        alphas_cumprod=sd_alphas_cumprod(spec.zero_terminal_snr), vae_scale_factor=spec.vae_scale_factor, spec=spec,
    )


def load_vae_file(path: Path) -> dict[str, torch.Tensor]:
    """A standalone VAE file (`.safetensors`/`.pt`/`.ckpt`) as a diffusers AutoencoderKL state dict.

    Accepts the A1111/CompVis layout (with or without `first_stage_model.`, e.g.
    `vae-ft-mse-840000-ema-pruned`, `sdxl_vae.safetensors`) and the diffusers layout
    (`encoder.down_blocks.*`, also its old `query/key/value/proj_attn` attention names).
    """
    path = Path(path)
    sd = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if any(k.startswith("encoder.down.") for k in sd):
        try:
            config = detect_vae(sd, "")
        except UserError as e:
            raise UserError(f"{path.name} is not a usable VAE: {e}") from e
        out, unknown = convert_vae_ldm_to_diffusers(sd, len(config["block_out_channels"]))
        if unknown:
            log.warning("%s: ignoring %d unrecognized tensors: %s", path.name, len(unknown), few_names(unknown))
        return out
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return _modernize_diffusers_vae(sd)
    raise UserError(f"{path.name} is not a VAE Easel recognizes (expected encoder.down.* or encoder.down_blocks.* keys).")


def _modernize_diffusers_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    old_to_new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".mid_block.attentions.0." in k and len(parts) >= 2 and parts[-2] in old_to_new:
            k = ".".join(parts[:-2] + [old_to_new[parts[-2]], parts[-1]])
        if is_vae_attention_matrix(k) and v.ndim > 2:
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v
    return out


def apply_vae_state_dict(model: SDModel, sd: dict[str, torch.Tensor]) -> None:
    """Replace the model's VAE weights (diffusers names) in place, keeping its dtype and device.

    The tensors are copied, so `sd` stays usable (e.g. cached to re-apply later).
    """
    vae = model.vae
    own = vae.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise UserError("This VAE does not fit the loaded model "
                        f"(missing: {few_names(missing, 3) or 'none'}; unexpected: {few_names(unexpected, 3) or 'none'}). "
                        f"Choose a VAE made for {FAMILY_NAMES.get(model.family, model.family)}.")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"This VAE does not fit the loaded model (different shapes for {few_names(bad, 3)}). "
                        f"Choose a VAE made for {FAMILY_NAMES.get(model.family, model.family)}.")
    with torch.no_grad():
        for k, target in own.items():
            target.copy_(sd[k].to(device=target.device, dtype=target.dtype))
