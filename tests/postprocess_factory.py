"""Post-processing model files with the real architectures and random weights, written as users download them.

- `write_realesrgan_rrdb`: Real-ESRGAN's RRDBNet (`RealESRGAN_x4plus.pth`): basicsr key names
  (`conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_up1/2`, `conv_hr`, `conv_last`) inside `params_ema`.
  Full size is 64 features x 23 blocks (x4plus) or 6 blocks (anime_6B); tests use fewer.
- `write_compact`: the compact SRVGG net (`realesr-general-x4v3.pth`) inside `params`.
- `write_esrgan_old`: an original-ESRGAN-layout RRDBNet (`model.0.weight`, `model.1.sub.N.RDBk...`) as
  `.safetensors`, as community files in `models/ESRGAN` often are.
- `write_gfpgan_v14`: GFPGANv1-clean (`GFPGANv1.4.pth`, 512 px, channel multiplier 2) inside `params_ema`.
- `write_codeformer`: CodeFormer (`codeformer.pth`) inside `params_ema`.

Weights come from a seeded generator. The super-resolution nets are scaled so their output stays near
the (upscaled) input, as a trained net's would, instead of saturating. Plain module imported by tests
and benchmarks (not a test file).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(*shape, generator=gen) * (scale * math.sqrt(2.0 / fan_in))


def rrdb_state_dict(num_feat: int = 64, num_block: int = 23, num_grow: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """RRDBNet x4 in basicsr's key layout (what RealESRGAN_x4plus.pth holds under `params_ema`)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, scale: float = 1.0, bias: float = 0.0) -> None:
        sd[f"{name}.weight"] = _randn(gen, out_ch, in_ch, 3, 3, scale=scale)
        sd[f"{name}.bias"] = torch.full((out_ch,), bias)

    conv("conv_first", num_feat, 3)
    for b in range(num_block):
        for r in (1, 2, 3):
            for j in range(1, 6):
                in_ch = num_feat + (j - 1) * num_grow
                conv(f"body.{b}.rdb{r}.conv{j}", num_feat if j == 5 else num_grow, in_ch, scale=0.1)
    conv("conv_body", num_feat, num_feat, scale=0.1)
    conv("conv_up1", num_feat, num_feat, scale=0.5)
    conv("conv_up2", num_feat, num_feat, scale=0.5)
    conv("conv_hr", num_feat, num_feat, scale=0.5)
    conv("conv_last", 3, num_feat, scale=0.05, bias=0.5)
    # make the net pass the input's colours through: conv_first's centre tap copies RGB into features 0..2,
    # and conv_last reads them back (a residual path a trained SR net has in effect)
    with torch.no_grad():
        for c in range(3):
            sd["conv_first.weight"][c].zero_()
            sd["conv_first.weight"][c, c, 1, 1] = 1.0
            sd["conv_last.weight"][c, c, 1, 1] += 1.0
        sd["conv_last.bias"].zero_()
        for name in ("conv_up1", "conv_up2", "conv_hr"):
            for c in range(3):
                sd[f"{name}.weight"][c].zero_()
                sd[f"{name}.weight"][c, c, 1, 1] = 1.0
    return sd


def write_realesrgan_rrdb(path: Path, *, num_feat: int = 64, num_block: int = 23, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": rrdb_state_dict(num_feat, num_block, seed=seed)}, path)
    return path


def write_compact(path: Path, *, num_feat: int = 16, num_conv: int = 4, scale: int = 4, seed: int = 0) -> Path:
    """SRVGGNetCompact (`realesr-general-x4v3.pth` layout: `body.N.weight`, PReLU weights, under `params`)."""
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    torch.manual_seed(seed)
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale, act_type="prelu")
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("body.") and k.endswith(".weight") and sd[k].dim() == 4)
    sd[f"body.{last}.weight"] *= 0.1  # a small residual over the nearest-upscaled input
    sd[f"body.{last}.bias"] *= 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": sd}, path)
    return path


def write_esrgan_old(path: Path, *, num_feat: int = 16, num_block: int = 1, seed: int = 0) -> Path:
    """Original ESRGAN layout (`model.0`, `model.1.sub.N.RDBk.convJ.0`, `model.3/6/8/10`), as .safetensors or .pth."""
    sd_new = rrdb_state_dict(num_feat, num_block, seed=seed)
    sd: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        sd[f"model.0.{kind}"] = sd_new[f"conv_first.{kind}"]
        for b in range(num_block):
            for r in (1, 2, 3):
                for j in range(1, 6):
                    sd[f"model.1.sub.{b}.RDB{r}.conv{j}.0.{kind}"] = sd_new[f"body.{b}.rdb{r}.conv{j}.{kind}"]
        sd[f"model.1.sub.{num_block}.{kind}"] = sd_new[f"conv_body.{kind}"]
        sd[f"model.3.{kind}"] = sd_new[f"conv_up1.{kind}"]
        sd[f"model.6.{kind}"] = sd_new[f"conv_up2.{kind}"]
        sd[f"model.8.{kind}"] = sd_new[f"conv_hr.{kind}"]
        sd[f"model.10.{kind}"] = sd_new[f"conv_last.{kind}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def gfpgan_v14_module(seed: int = 0) -> torch.nn.Module:
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    return GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                  num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)


def write_gfpgan_v14(path: Path, *, seed: int = 0) -> Path:
    """GFPGANv1.4-shaped file (GFPGANv1Clean, 512 px): `params_ema` as the released GFPGANv1.4.pth."""
    net = gfpgan_v14_module(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": net.state_dict()}, path)
    return path


def write_codeformer(path: Path, *, n_layers: int = 9, seed: int = 0) -> Path:
    """CodeFormer-shaped file (VQGAN 512 px, codebook 1024x256, `n_layers` transformer layers): `params_ema`."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(seed)
    net = CodeFormer(dim_embd=512, n_head=8, n_layers=n_layers, codebook_size=1024, latent_size=256,
                     connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": net.state_dict()}, path)
    return path


# The files the tests use, by key: (folder under models/, file name, writer, writer arguments).
TEST_MODELS = {
    "rrdb": ("RealESRGAN", "RealESRGAN_x4plus.pth", write_realesrgan_rrdb, {"num_feat": 16, "num_block": 1}),
    "compact": ("RealESRGAN", "realesr-general-x4v3.pth", write_compact, {"num_feat": 16, "num_conv": 4}),
    "esrgan_old": ("ESRGAN", "4x-Tiny.safetensors", write_esrgan_old, {"num_feat": 16, "num_block": 1}),
    "gfpgan": ("GFPGAN", "GFPGANv1.4.pth", write_gfpgan_v14, {}),
    "codeformer": ("Codeformer", "codeformer-v0.1.0.pth", write_codeformer, {}),
}


def write_test_models(models_dir: Path, keys: tuple[str, ...] = tuple(TEST_MODELS)) -> dict[str, Path]:
    """Write the test files (tiny super-resolution nets, full-size face nets) into `models_dir`, once."""
    made = {}
    for key in keys:
        folder, name, writer, kwargs = TEST_MODELS[key]
        path = models_dir / folder / name
        if not path.exists():
            part = path.with_name(path.name + ".tmp" + path.suffix)
            writer(part, **kwargs)
            part.replace(path)
        made[key] = path
    return made


def link_models(files: dict[str, Path], models_dir: Path) -> None:
    """Put the written files into another data folder's models/ (hard links where possible)."""
    import os
    import shutil

    for path in files.values():
        target = models_dir / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
