"""Live previews of the image being sampled, by the method of the setting `show_progress_type` (A1111's):

- "Approx cheap": a linear map of the latent channels to RGB (no file; SD1/SD2, SDXL and the 16 channels of FLUX and
  SD3 have their own factors).
- "Approx NN": A1111's VAE approximation, a small convolutional network (`models/VAE-approx/model.pt` for SD1/SD2,
  `vaeapprox-sdxl.pt` for SDXL), giving a picture twice the latent's size. FLUX and SD3 have none: "Approx cheap".
- "TAESD": the tiny autoencoder's decoder (madebyollin/taesd: `taesd_decoder.pth`, `taesdxl_decoder.pth`, and for
  the 16-channel latents `taef1_decoder.pth` (FLUX) and `taesd3_decoder.pth` (SD3), as Forge and ComfyUI use them;
  in `models/VAE-taesd` as A1111 keeps them, or `models/VAE-approx`), the full size.
- "Full": the checkpoint's VAE.

The network files are downloaded on first use (a progress bar in the console); when a file is missing and cannot be
downloaded (offline), previews use "Approx cheap" and one log line says why. Every preview is shown at the pass's
size in pixels. `PreviewDecoders` keeps the loaded networks for the backend process.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from backend.core.errors import UserError

log = logging.getLogger(__name__)

# A1111's "Approx cheap" latent -> RGB factors (sd_vae_approx.cheap_approximation), rows = latent channels.
CHEAP_RGB = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163), (-0.3730, -0.2499, -0.2088)),
}
# FLUX's and SD3's 16 channels (ComfyUI's latent_formats factors), with the bias added to each RGB channel.
CHEAP_RGB["flux"] = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778))
CHEAP_RGB["sd3"] = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189))
CHEAP_RGB_BIAS = {"flux": (-0.0329, -0.0718, -0.0851), "sd3": (0.2394, 0.2135, 0.1925)}
APPROX_NN_FILES = {"sd": "model.pt", "sdxl": "vaeapprox-sdxl.pt"}
APPROX_NN_URL = "https://github.com/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/"
TAESD_FILES = {"sd": "taesd_decoder.pth", "sdxl": "taesdxl_decoder.pth", "flux": "taef1_decoder.pth",
               "sd3": "taesd3_decoder.pth"}
# TAESD's encoders (setting `sd_vae_encode_method`: img2img's and hires. fix's encode), in the same folders.
TAESD_ENCODER_FILES = {"sd": "taesd_encoder.pth", "sdxl": "taesdxl_encoder.pth", "flux": "taef1_encoder.pth",
                       "sd3": "taesd3_encoder.pth"}
# the latent channels of each kind's latents (TAESD's first decoder / last encoder convolution)
LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "flux": 16, "sd3": 16}
TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/"


class VAEApprox(nn.Module):
    """A1111's "Approx NN" network: 2x nearest upsampling, 11 pixels of padding, eight unpadded convolutions
    (4 -> 8 -> 16 -> 32 -> 64 -> 32 -> 16 -> 8 -> 3 channels; 7x7, 5x5, then 3x3) each followed by a leaky ReLU (0.1).
    Output: RGB in [-1, 1] at twice the latent's size. Parameter names as in its `model.pt`."""

    def __init__(self):
        super().__init__()
        widths = (4, 8, 16, 32, 64, 32, 16, 8, 3)
        kernels = (7, 5, 3, 3, 3, 3, 3, 3)
        for i, k in enumerate(kernels):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], k))
        self.layers = len(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2))
        x = nn.functional.pad(x, (11, 11, 11, 11))
        for i in range(self.layers):
            x = nn.functional.leaky_relu(getattr(self, f"conv{i + 1}")(x), 0.1)
        return x


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _TAEBlock(nn.Module):
    """Three 3x3 convolutions (ReLU between) added to the input, then a ReLU; 64 channels throughout."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


def taesd_decoder(latent_channels: int = 4) -> nn.Sequential:
    """TAESD's decoder (madebyollin/taesd): clamp, a 3x3 convolution to 64 channels, then three stages of three
    blocks each followed by a 2x upsampling and a bias-free convolution, a last block and a convolution to RGB.
    Input: the latents as the UNet (or FLUX's / SD3's transformer) sees them, 4 or 16 channels; output: RGB in
    [0, 1] at 8x the latent's size. The module indices are the key names of its `.pth` files ("1.weight",
    "3.conv.0.weight", ...)."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, 64), nn.ReLU()]
    for _ in range(3):
        layers += [_TAEBlock(), _TAEBlock(), _TAEBlock(), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]
    layers += [_TAEBlock(), _conv(64, 3)]
    return nn.Sequential(*layers)


def taesd_encoder(latent_channels: int = 4) -> nn.Sequential:
    """TAESD's encoder (madebyollin/taesd): a 3x3 convolution from RGB to 64 channels and a block, three stages of a
    bias-free stride-2 convolution and three blocks, and a convolution to the 4 (16) latent channels. Input: RGB in
    [0, 1]; output: the latents as the UNet sees them (scaled), at 1/8 of the picture's size. The module indices are
    the key names of its `.pth` files ("0.weight", "1.conv.0.weight", ... "14.weight")."""
    layers: list[nn.Module] = [_conv(3, 64), _TAEBlock()]
    for _ in range(3):
        layers += [nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), _TAEBlock(), _TAEBlock(), _TAEBlock()]
    layers += [_conv(64, latent_channels)]
    return nn.Sequential(*layers)


def latent_kind(family: str) -> str:
    """Which preview factors/networks fit a model family's latents: SDXL's, FLUX's, SD3's, or SD1/SD2's (the same
    VAE)."""
    if family in ("flux", "sd3"):
        return family
    return "sdxl" if family in ("sdxl", "sdxl_refiner") else "sd"


def cheap_rgb(latent: torch.Tensor, family: str) -> torch.Tensor:
    """"Approx cheap": the first image's latent [C, h, w] -> RGB [3, h, w] in about [-1, 1]."""
    kind = latent_kind(family)
    coefs = torch.tensor(CHEAP_RGB[kind], device=latent.device, dtype=torch.float32)
    rgb = torch.einsum("lxy,lr->rxy", latent[:coefs.shape[0]].float(), coefs)
    if kind in CHEAP_RGB_BIAS:
        rgb = rgb + torch.tensor(CHEAP_RGB_BIAS[kind], device=latent.device, dtype=torch.float32)[:, None, None]
    return rgb


def to_picture(rgb: torch.Tensor, width: int, height: int) -> Image.Image:
    """RGB [3, h, w] in [-1, 1] -> a picture of `width` x `height` (smoothed when the method's is smaller)."""
    arr = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    return img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)


class PreviewDecoders:
    """The preview networks of the backend process: found in the models folder, downloaded once when missing,
    loaded once, kept. A file that is missing and cannot be downloaded is not tried again until the process
    restarts (the previews then use "Approx cheap")."""

    def __init__(self, models_dir: Path, allow_download: bool = True):
        self.approx_dir = Path(models_dir) / "VAE-approx"
        self.taesd_dir = Path(models_dir) / "VAE-taesd"
        self.allow_download = allow_download
        self._nets: dict[str, nn.Module] = {}
        self._unavailable: set[str] = set()

    def _find(self, name: str, folders: list[Path]) -> Path | None:
        return next((folder / name for folder in folders if (folder / name).is_file()), None)

    def _fetch(self, name: str, folders: list[Path], url: str, use: str = "live previews",
               fallback: str = "previews use Approx cheap") -> Path | None:
        found = self._find(name, folders)
        if found is not None or name in self._unavailable:
            return found
        from backend.downloads import download_file, network_available
        why = None
        if not self.allow_download:
            why = "downloads are off"
        elif not network_available(url):
            why = "no internet connection"
        else:
            try:
                return download_file(url, folders[0] / name)
            except UserError as exc:
                why = exc.message
        self._unavailable.add(name)
        log.warning("%s: %s is not in %s and could not be downloaded (%s); %s. Put %s there to use it.",
                    use, name, folders[0], why, fallback, url)
        return None

    def network(self, method: str, family: str, use: str = "live previews",
                fallback: str = "previews use Approx cheap") -> nn.Module | None:
        """The loaded network of `method` ("Approx NN", "TAESD" or "TAESD encoder") for `family`, or None when its
        file is not there and cannot be downloaded (one log line says so, naming the `use` and its `fallback`)."""
        kind = latent_kind(family)
        if method == "Approx NN":
            if kind not in APPROX_NN_FILES:
                return None  # FLUX, SD3: none published
            name, folders, url, build = APPROX_NN_FILES[kind], [self.approx_dir], APPROX_NN_URL, VAEApprox
        elif method == "TAESD":
            name, folders, url = TAESD_FILES[kind], [self.taesd_dir, self.approx_dir], TAESD_URL
            build = lambda: taesd_decoder(LATENT_CHANNELS[kind])  # noqa: E731
        elif method == "TAESD encoder":
            name, folders, url = TAESD_ENCODER_FILES[kind], [self.taesd_dir, self.approx_dir], TAESD_URL
            build = lambda: taesd_encoder(LATENT_CHANNELS[kind])  # noqa: E731
        else:
            raise ValueError(f"no preview network for {method!r}")
        if name in self._nets:
            return self._nets[name]
        path = self._fetch(name, folders, url + name, use, fallback)
        if path is None:
            return None
        from backend.engine.state_dict_io import read_state_dict
        net = build()
        try:
            net.load_state_dict(read_state_dict(path))
        except (RuntimeError, KeyError, UserError) as exc:
            self._unavailable.add(name)
            reason = exc.message if isinstance(exc, UserError) else (str(exc).splitlines() or [""])[0]
            log.warning("%s: %s does not hold the %s network (%s); %s. Delete it to download it again.",
                        use, path, method, reason, fallback)
            return None
        self._nets[name] = net.eval()
        return net

    @torch.no_grad()
    def rgb(self, method: str, family: str, latent: torch.Tensor) -> torch.Tensor | None:
        """RGB [3, h', w'] in [-1, 1] of one latent [C, h, w] by a network method, or None (no network)."""
        net = self.network(method, family)
        if net is None:
            return None
        net.to(latent.device)
        channels = LATENT_CHANNELS[latent_kind(family)]
        out = net(latent[None, :channels].float())[0]
        return out * 2 - 1 if method == "TAESD" else out  # TAESD decodes to [0, 1]


def make_preview(method: str, family: str, latent: torch.Tensor, width: int, height: int,
                 decoders: PreviewDecoders | None, full: Callable[[torch.Tensor], Image.Image]) -> Image.Image:
    """The preview picture of the first image of `latent` [B, C, h, w] (the sampler's x0 prediction) by `method`;
    `full(latent[:1])` decodes with the checkpoint's VAE. Without `decoders` (a pipeline run directly) or without
    a network's file, the network methods fall back to "Approx cheap"."""
    if method == "Full":
        img = full(latent[:1])
        return img if img.size == (width, height) else img.resize((width, height), Image.BILINEAR)
    rgb = None
    if method in ("Approx NN", "TAESD") and decoders is not None:
        rgb = decoders.rgb(method, family, latent[0])  # None: no network for this family, or no file
    if rgb is None:
        rgb = cheap_rgb(latent[0], family)
    return to_picture(rgb, width, height)
