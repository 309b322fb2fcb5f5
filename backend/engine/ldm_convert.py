"""Key mapping between the CompVis/A1111 single-file layout and diffusers/transformers modules.

Both directions come from the same per-key rules, so `diffusers_to_ldm` is the exact
inverse of `ldm_to_diffusers` (tested by round trips). We do not use diffusers'
`convert_ldm_*` helpers: they need an original yaml-style config, their OpenCLIP
converter drops SD2's last text layer and writes transformers-4 names, and diffusers
has no writer for the other direction.

Tensor changes beyond renaming:
- VAE mid-block attention: LDM 1x1 convs `[C, C, 1, 1]` <-> diffusers linears `[C, C]`.
- OpenCLIP attention: one `in_proj_weight` `[3H, H]` <-> separate q/k/v projections.
- OpenCLIP `text_projection` is applied as `x @ P` (`[hidden, proj]`); transformers'
  `text_projection.weight` is `[proj, hidden]`: transposed both ways.

Text encoder state dicts use transformers 5 names: `CLIPTextModel` keys have no
`text_model.` prefix (`embeddings.*`, `encoder.*`, `final_layer_norm.*`);
`CLIPTextModelWithProjection` keys are `text_model.*` plus `text_projection.weight`.
"""
from __future__ import annotations

import re

import torch

from backend.engine.model_detection import UNET_PREFIX, VAE_PREFIX, ModelSpec

_RESNET_LDM_TO_DIFF = {
    ("in_layers", "0"): "norm1",
    ("in_layers", "2"): "conv1",
    ("emb_layers", "1"): "time_emb_proj",
    ("out_layers", "0"): "norm2",
    ("out_layers", "3"): "conv2",
}
_RESNET_DIFF_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFF.items()}


class UNetLayout:
    """The block layout of a UNet2DConditionModel config that the LDM <-> diffusers key mapping needs:
    levels, resnets per level (`lpb`) and which down/up levels carry cross-attention."""

    def __init__(self, unet_config: dict):
        self.levels = len(unet_config["block_out_channels"])
        lpb = unet_config["layers_per_block"]
        if not isinstance(lpb, int):
            if len(set(lpb)) != 1:
                raise ValueError("per-level layers_per_block is not supported by the LDM layout mapping")
            lpb = lpb[0]
        self.lpb = int(lpb)
        self.down_attn = [t.startswith("CrossAttn") for t in unet_config["down_block_types"]]
        self.up_attn = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]


# -- UNet ---------------------------------------------------------------------------------------
def _resnet_to_diffusers(rest: list[str]) -> str | None:
    if len(rest) >= 3 and (rest[0], rest[1]) in _RESNET_LDM_TO_DIFF:
        return ".".join([_RESNET_LDM_TO_DIFF[(rest[0], rest[1])]] + rest[2:])
    if len(rest) >= 2 and rest[0] == "skip_connection":
        return ".".join(["conv_shortcut"] + rest[1:])
    return None


def _resnet_to_ldm(rest: list[str]) -> str | None:
    if len(rest) >= 2 and rest[0] in _RESNET_DIFF_TO_LDM:
        return ".".join(list(_RESNET_DIFF_TO_LDM[rest[0]]) + rest[1:])
    if len(rest) >= 2 and rest[0] == "conv_shortcut":
        return ".".join(["skip_connection"] + rest[1:])
    return None


def unet_key_to_diffusers(key: str, layout: UNetLayout) -> str | None:
    """An LDM UNet key (without `model.diffusion_model.`) as a diffusers UNet2DConditionModel key."""
    p = key.split(".")
    head = p[0]
    try:
        if head == "time_embed" and p[1] in ("0", "2"):
            return ".".join(["time_embedding", "linear_1" if p[1] == "0" else "linear_2"] + p[2:])
        if head == "label_emb" and p[1] == "0" and p[2] in ("0", "2"):
            return ".".join(["add_embedding", "linear_1" if p[2] == "0" else "linear_2"] + p[3:])
        if head == "out" and p[1] in ("0", "2"):
            return ".".join(["conv_norm_out" if p[1] == "0" else "conv_out"] + p[2:])
        if head == "input_blocks":
            n, k, rest = int(p[1]), p[2], p[3:]
            if n == 0:
                return ".".join(["conv_in"] + rest) if k == "0" else None
            level, j = divmod(n - 1, layout.lpb + 1)
            if level >= layout.levels:
                return None
            if j == layout.lpb:
                if k == "0" and rest and rest[0] == "op":
                    return ".".join([f"down_blocks.{level}.downsamplers.0.conv"] + rest[1:])
                return None
            if k == "0":
                r = _resnet_to_diffusers(rest)
                return f"down_blocks.{level}.resnets.{j}.{r}" if r else None
            if k == "1" and layout.down_attn[level]:
                return ".".join([f"down_blocks.{level}.attentions.{j}"] + rest)
            return None
        if head == "middle_block":
            k, rest = p[1], p[2:]
            if k in ("0", "2"):
                r = _resnet_to_diffusers(rest)
                return f"mid_block.resnets.{int(k) // 2}.{r}" if r else None
            if k == "1":
                return ".".join(["mid_block.attentions.0"] + rest)
            return None
        if head == "output_blocks":
            n, k, rest = int(p[1]), p[2], p[3:]
            level, j = divmod(n, layout.lpb + 1)
            if level >= layout.levels:
                return None
            if k == "0":
                r = _resnet_to_diffusers(rest)
                return f"up_blocks.{level}.resnets.{j}.{r}" if r else None
            if k == "1" and layout.up_attn[level]:
                return ".".join([f"up_blocks.{level}.attentions.{j}"] + rest)
            if (k == "2" or (k == "1" and not layout.up_attn[level])) and rest and rest[0] == "conv":
                if j == layout.lpb and level < layout.levels - 1:
                    return ".".join([f"up_blocks.{level}.upsamplers.0.conv"] + rest[1:])
            return None
    except (IndexError, ValueError):
        return None
    return None


def unet_key_to_ldm(key: str, layout: UNetLayout) -> str | None:
    """A diffusers UNet2DConditionModel key as an LDM UNet key (without `model.diffusion_model.`)."""
    p = key.split(".")
    head = p[0]
    step = layout.lpb + 1
    try:
        if head == "time_embedding" and p[1] in ("linear_1", "linear_2"):
            return ".".join(["time_embed", "0" if p[1] == "linear_1" else "2"] + p[2:])
        if head == "add_embedding" and p[1] in ("linear_1", "linear_2"):
            return ".".join(["label_emb.0", "0" if p[1] == "linear_1" else "2"] + p[2:])
        if head == "conv_norm_out":
            return ".".join(["out.0"] + p[1:])
        if head == "conv_out":
            return ".".join(["out.2"] + p[1:])
        if head == "conv_in":
            return ".".join(["input_blocks.0.0"] + p[1:])
        if head == "down_blocks":
            level, kind = int(p[1]), p[2]
            if kind == "downsamplers" and p[3] == "0" and p[4] == "conv":
                return ".".join([f"input_blocks.{1 + level * step + layout.lpb}.0.op"] + p[5:])
            j = int(p[3])
            n = 1 + level * step + j
            if kind == "resnets":
                r = _resnet_to_ldm(p[4:])
                return f"input_blocks.{n}.0.{r}" if r else None
            if kind == "attentions":
                return ".".join([f"input_blocks.{n}.1"] + p[4:])
            return None
        if head == "mid_block":
            kind, idx = p[1], int(p[2])
            if kind == "resnets":
                r = _resnet_to_ldm(p[3:])
                return f"middle_block.{idx * 2}.{r}" if r else None
            if kind == "attentions" and idx == 0:
                return ".".join(["middle_block.1"] + p[3:])
            return None
        if head == "up_blocks":
            level, kind = int(p[1]), p[2]
            if kind == "upsamplers" and p[3] == "0" and p[4] == "conv":
                sub = 2 if layout.up_attn[level] else 1
                return ".".join([f"output_blocks.{level * step + layout.lpb}.{sub}.conv"] + p[5:])
            j = int(p[3])
            n = level * step + j
            if kind == "resnets":
                r = _resnet_to_ldm(p[4:])
                return f"output_blocks.{n}.0.{r}" if r else None
            if kind == "attentions":
                return ".".join([f"output_blocks.{n}.1"] + p[4:])
            return None
    except (IndexError, ValueError):
        return None
    return None


# -- VAE ----------------------------------------------------------------------------------------
# One table serves both directions: (LDM prefix, diffusers prefix, how the rest of the key is renamed).
# `{part}` is encoder or decoder, `{i}` a level, `{j}` a block; the decoder's LDM levels count from the
# other end (`up.{I}` is diffusers' `up_blocks.{n_levels - 1 - I}`). The rest of the key after the prefix
# is kept, except that a resnet's shortcut is renamed and an attention's projection must be a known one.
_VAE_RESNET_REST = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN_REST = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_KEY_TABLE: tuple[tuple[str, str, dict[str, str] | None, bool], ...] = (
    # (ldm, diffusers, renamed first parts of the rest, rest must be renamed)
    ("quant_conv", "quant_conv", None, False),
    ("post_quant_conv", "post_quant_conv", None, False),
    ("{part}.conv_in", "{part}.conv_in", None, False),
    ("{part}.conv_out", "{part}.conv_out", None, False),
    ("{part}.norm_out", "{part}.conv_norm_out", None, False),
    ("{part}.mid.block_1", "{part}.mid_block.resnets.0", _VAE_RESNET_REST, False),
    ("{part}.mid.block_2", "{part}.mid_block.resnets.1", _VAE_RESNET_REST, False),
    ("{part}.mid.attn_1", "{part}.mid_block.attentions.0", _VAE_ATTN_REST, True),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET_REST, False),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", None, False),
    ("decoder.up.{I}.block.{j}", "decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET_REST, False),
    ("decoder.up.{I}.upsample.conv", "decoder.up_blocks.{i}.upsamplers.0.conv", None, False),
)


def _match_vae_prefix(template: list[str], parts: list[str], n_levels: int) -> dict[str, object] | None:
    """The values of `template`'s placeholders if `parts` starts with it, else None."""
    if len(parts) < len(template):
        return None
    found: dict[str, object] = {}
    for want, got in zip(template, parts):
        if want == "{part}":
            if got not in ("encoder", "decoder"):
                return None
            found["part"] = got
        elif want in ("{i}", "{j}", "{I}"):
            try:
                number = int(got)
            except ValueError:
                return None
            if want == "{I}":
                found["i"] = n_levels - 1 - number
            else:
                found[want[1:-1]] = number
        elif want != got:
            return None
    return found


def _fill_vae_prefix(template: list[str], found: dict[str, object], n_levels: int) -> list[str]:
    values = {**found, "I": n_levels - 1 - found["i"]} if "i" in found else found
    return [str(values[t[1:-1]]) if t.startswith("{") else t for t in template]


def _rename_vae_rest(rest: list[str], names: dict[str, str] | None, required: bool) -> list[str] | None:
    """The rest of a key with its leading name (one or more dotted parts) renamed by `names`;
    None when `required` and it holds none of them."""
    for old, new in (names or {}).items():
        old_parts = old.split(".")
        if rest[:len(old_parts)] == old_parts:
            return new.split(".") + rest[len(old_parts):]
    return None if required else rest


def _vae_key(key: str, n_levels: int, to_diffusers: bool) -> str | None:
    parts = key.split(".")
    for ldm, diffusers, rest_names, required in _VAE_KEY_TABLE:
        source, target = (ldm, diffusers) if to_diffusers else (diffusers, ldm)
        source_parts = source.split(".")
        found = _match_vae_prefix(source_parts, parts, n_levels)
        if found is None:
            continue
        if rest_names and not to_diffusers:
            rest_names = {new: old for old, new in rest_names.items()}
        rest = _rename_vae_rest(parts[len(source_parts):], rest_names, required)
        if rest is None:
            return None
        return ".".join(_fill_vae_prefix(target.split("."), found, n_levels) + rest)
    return None


def vae_key_to_diffusers(key: str, n_levels: int) -> str | None:
    """An LDM VAE key (without `first_stage_model.`) as a diffusers AutoencoderKL key."""
    return _vae_key(key, n_levels, to_diffusers=True)


def vae_key_to_ldm(key: str, n_levels: int) -> str | None:
    """A diffusers AutoencoderKL key as an LDM VAE key (without `first_stage_model.`)."""
    return _vae_key(key, n_levels, to_diffusers=False)


def is_vae_attention_matrix(diffusers_key: str) -> bool:
    """A diffusers VAE mid-block attention projection weight: `[C, C]` there, a 1x1 conv `[C, C, 1, 1]` in LDM."""
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(".weight") and \
        any(f".{n}.weight" in diffusers_key for n in ("to_q", "to_k", "to_v", "to_out.0"))


def convert_vae_ldm_to_diffusers(vae_sd: dict[str, torch.Tensor], n_levels: int) -> tuple[dict, list[str]]:
    """LDM VAE tensors (no prefix) -> diffusers names; returns (state dict, keys that matched no rule)."""
    out, unknown = {}, []
    for k, v in vae_sd.items():
        if k.startswith("loss.") or k.startswith("model_ema."):
            continue  # training leftovers (discriminator, EMA copies) in some VAE files
        nk = vae_key_to_diffusers(k, n_levels)
        if nk is None:
            unknown.append(k)
            continue
        if is_vae_attention_matrix(nk) and v.ndim > 2:
            v = v.reshape(v.shape[0], v.shape[1])
        out[nk] = v
    return out, unknown


def convert_vae_diffusers_to_ldm(vae_sd: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in vae_sd.items():
        nk = vae_key_to_ldm(k, n_levels)
        if nk is None:
            raise KeyError(f"no LDM name for VAE key {k}")
        if is_vae_attention_matrix(k) and v.ndim == 2:
            v = v.reshape(v.shape[0], v.shape[1], 1, 1)
        out[nk] = v
    return out


# -- text encoders ------------------------------------------------------------------------------
_OPENCLIP_LAYER_TO_HF = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_HF_LAYER_TO_OPENCLIP = {v: k for k, v in _OPENCLIP_LAYER_TO_HF.items()}
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")
_OPENAI_IGNORED = ("embeddings.position_ids",)


def openai_clip_to_hf(sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """HF-layout CLIP text keys (prefix removed, with or without `text_model.`) -> transformers 5 CLIPTextModel keys."""
    out, unknown = {}, []
    for k, v in sd.items():
        if k.startswith("text_model."):
            k = k[len("text_model."):]
        if k in _OPENAI_IGNORED:
            continue
        if k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            out[k] = v
        else:
            unknown.append(k)
    return out, unknown


def openclip_to_hf(sd: dict[str, torch.Tensor], *, with_projection: bool) -> tuple[dict, list[str]]:
    """OpenCLIP text-tower keys (prefix removed) -> transformers 5 CLIPTextModel(/WithProjection) keys."""
    out, unknown = {}, []
    layer_re = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    for k, v in sd.items():
        if k in _OPENCLIP_IGNORED:
            continue
        if k == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["final_layer_norm." + k[len("ln_final."):]] = v
        elif k == "text_projection":
            if with_projection:
                out["text_projection.weight"] = v.t().contiguous()
        else:
            m = layer_re.match(k)
            if not m:
                unknown.append(k)
                continue
            n, rest = m.group(1), m.group(2)
            base = f"encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                # copies, so the three parameters do not share one storage (safetensors refuses shared tensors)
                q, kk, vv = (t.clone() for t in v.chunk(3, dim=0))
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = kk
                out[base + f"self_attn.v_proj.{kind}"] = vv
                continue
            name, _, leaf = rest.rpartition(".")
            if name in _OPENCLIP_LAYER_TO_HF:
                out[base + _OPENCLIP_LAYER_TO_HF[name] + "." + leaf] = v
            else:
                unknown.append(k)
    if with_projection:
        out = {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in out.items()}
    return out, unknown


def hf_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys (with or without `text_model.`) -> OpenCLIP text-tower keys (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        if k.startswith("text_model."):
            k = k[len("text_model."):]
        if k in _OPENAI_IGNORED:
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k[len("final_layer_norm."):]] = v
        else:
            m = layer_re.match(k)
            if not m:
                raise KeyError(f"no OpenCLIP name for text encoder key {k}")
            n, name, leaf = m.groups()
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, leaf), {})[name[-6]] = v
            elif name in _HF_LAYER_TO_OPENCLIP:
                out[f"transformer.resblocks.{n}.{_HF_LAYER_TO_OPENCLIP[name]}.{leaf}"] = v
            else:
                raise KeyError(f"no OpenCLIP name for text encoder key {k}")
    for (n, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"text encoder layer {n} lacks one of its q/k/v projections")
        out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# -- whole checkpoints --------------------------------------------------------------------------
def _strip(state_dict: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}


def ldm_to_diffusers(state_dict: dict[str, torch.Tensor], spec: ModelSpec, *,
                     unknown: list[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split an A1111-layout checkpoint into diffusers/transformers state dicts.

    Returns {"unet", "vae", "text_encoder"} (+ "text_encoder_2" for SDXL). EMA copies
    (`model_ema.*`) and training buffers are ignored. Keys under a module prefix that
    match no rule are appended to `unknown` (with their full name) when given; the
    loader's strict check reports them.
    """
    unknown = unknown if unknown is not None else []
    layout = UNetLayout(spec.unet_config)
    unet = {}
    for k, v in _strip(state_dict, UNET_PREFIX).items():
        nk = unet_key_to_diffusers(k, layout)
        if nk is None:
            unknown.append(UNET_PREFIX + k)
        else:
            unet[nk] = v

    n_vae_levels = len(spec.vae_config["block_out_channels"])
    vae, vae_unknown = convert_vae_ldm_to_diffusers(_strip(state_dict, VAE_PREFIX), n_vae_levels)
    unknown.extend(VAE_PREFIX + k for k in vae_unknown)

    result = {"unet": unet, "vae": vae}
    for index, (prefix, layout_name, cls_name) in enumerate(
            zip(spec.text_encoder_prefixes, spec.text_encoder_layouts, spec.text_encoder_classes)):
        part = _strip(state_dict, prefix)
        with_projection = cls_name.endswith("Projection")
        if layout_name == "openai":
            te, te_unknown = openai_clip_to_hf(part)
            if with_projection:
                te = {"text_model." + k: v for k, v in te.items()}
        else:
            te, te_unknown = openclip_to_hf(part, with_projection=with_projection)
        unknown.extend(prefix + k for k in te_unknown)
        result["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = te
    return result


def diffusers_to_ldm(unet_sd: dict[str, torch.Tensor], vae_sd: dict[str, torch.Tensor],
                     text_encoder_sds: list[dict[str, torch.Tensor]], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The exact inverse of `ldm_to_diffusers`: diffusers/transformers state dicts -> one A1111-layout dict.

    Text encoder dicts may use transformers 4 or 5 names (with or without `text_model.`).
    """
    layout = UNetLayout(spec.unet_config)
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_sd.items():
        nk = unet_key_to_ldm(k, layout)
        if nk is None:
            raise KeyError(f"no LDM name for UNet key {k}")
        out[UNET_PREFIX + nk] = v
    n_vae_levels = len(spec.vae_config["block_out_channels"])
    for k, v in convert_vae_diffusers_to_ldm(vae_sd, n_vae_levels).items():
        out[VAE_PREFIX + k] = v
    if len(text_encoder_sds) != len(spec.text_encoder_prefixes):
        raise ValueError(f"{spec.family} has {len(spec.text_encoder_prefixes)} text encoders, got {len(text_encoder_sds)}")
    for sd, prefix, layout_name in zip(text_encoder_sds, spec.text_encoder_prefixes, spec.text_encoder_layouts):
        if layout_name == "openai":
            for k, v in sd.items():
                bare = k[len("text_model."):] if k.startswith("text_model.") else k
                if bare in _OPENAI_IGNORED or k == "text_projection.weight":
                    continue
                out[prefix + bare] = v
        else:
            for k, v in hf_to_openclip(sd).items():
                out[prefix + k] = v
    return out
