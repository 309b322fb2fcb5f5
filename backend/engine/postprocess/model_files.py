"""Post-processing model files: reading them safely, loading them with spandrel, caching them on their device.

(Finding them is `backend.postprocess.model_files`, `upscaler_catalog`: no torch there.)

The files are the ones users download for A1111 and the upstream projects (ESRGAN / Real-ESRGAN
`.pth`, SwinIR, DAT, HAT, ..., `GFPGANv1.4.pth`, `codeformer.pth`), in any of their layouts:
flat state dicts, or wrapped in `params_ema` / `params` / `state_dict`. `.safetensors` is read with
safetensors, everything else with `torch.load(weights_only=True)`; nothing is unpickled beyond plain
data. spandrel (with `spandrel_extra_arches` for CodeFormer) detects the architecture from the keys.
Every problem with a file (missing, corrupt, not a model, an architecture spandrel does not know, a
face model where an upscaler is expected, ...) becomes a `UserError` naming the file.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.errors import UserError
from backend.postprocess.model_files import MODEL_EXTENSIONS

log = logging.getLogger("easel.postprocess")

KINDS = ("upscaler", "gfpgan", "codeformer")
# Which `--use-cpu` part (A1111's names) each kind of model follows.
DEVICE_PART = {"upscaler": "esrgan", "gfpgan": "gfpgan", "codeformer": "codeformer"}


def read_model_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a post-processing model file, unwrapped from the upstream containers."""
    from spandrel import canonicalize_state_dict

    from backend.core.tensor_headers import PICKLE_SUFFIXES
    from backend.engine.state_dict_io import load_pickle, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}", status=404)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = read_state_dict(path)
    elif suffix in PICKLE_SUFFIXES:
        state = load_pickle(path)  # whole: spandrel unwraps the containers (params_ema, ...) below
    else:
        raise UserError(f"Unsupported model file type {suffix or '(none)'!r} for {path.name}: "
                        f"expected one of {', '.join(MODEL_EXTENSIONS)}.")
    if not isinstance(state, dict):
        raise UserError(f"{path.name} does not hold a state dict (found {type(state).__name__}).")
    state = canonicalize_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path.name} holds no model weights.")
    return tensors


@functools.lru_cache(maxsize=1)
def architecture_registry():
    """spandrel's architectures plus the extra ones (CodeFormer), in a registry of our own (spandrel's is left as is)."""
    from spandrel import MAIN_REGISTRY
    from spandrel_extra_arches import EXTRA_REGISTRY

    registry = MAIN_REGISTRY.copy()
    registry.add(*EXTRA_REGISTRY, ignore_duplicates=True)
    return registry


def load_model(path: Path, kind: str):
    """-> a spandrel `ImageModelDescriptor` on the CPU in float32, checked to be of `kind` (upscaler, gfpgan, codeformer)."""
    from spandrel import ImageModelDescriptor, UnsupportedModelError

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    path = Path(path)
    state = read_model_state_dict(path)
    try:
        model = architecture_registry().load(state)
    except UnsupportedModelError as exc:
        raise UserError(f"{path.name} is not a model architecture Easel can load: spandrel recognises none in it "
                        f"(supported: ESRGAN/Real-ESRGAN, SwinIR, DAT, HAT, OmniSR, SPAN, ... for upscaling; GFPGAN and "
                        f"CodeFormer for faces).") from exc
    except Exception as exc:  # noqa: BLE001  an architecture matched, but its weights do not fit it
        raise UserError(f"{path.name} looks like a known architecture but its weights do not fit it "
                        f"({type(exc).__name__}: {_first_line(exc)}); the file may be damaged or a variant "
                        f"that is not supported.") from exc
    arch = model.architecture.name
    if not isinstance(model, ImageModelDescriptor):
        raise UserError(f"{path.name} is a {arch} {model.purpose.lower()} model, not an image-to-image model "
                        f"Easel can use for {_kind_label(kind)}.")
    if kind == "upscaler" and model.purpose == "FaceSR":
        raise UserError(f"{path.name} is a face restoration model ({arch}), not an upscaler: put it in "
                        f"models/GFPGAN or models/Codeformer.")
    if kind == "gfpgan" and (model.purpose != "FaceSR" or model.architecture.id == "CodeFormer"):
        raise UserError(f"{path.name} is not a GFPGAN face restoration model (it holds a {arch} model).")
    if kind == "codeformer" and model.architecture.id != "CodeFormer":
        raise UserError(f"{path.name} is not a CodeFormer model (it holds a {arch} model).")
    if model.input_channels not in (1, 3) or model.output_channels not in (1, 3):
        raise UserError(f"{path.name}: {arch} models with {model.input_channels} input / {model.output_channels} "
                        f"output channels are not supported (RGB or grayscale only).")
    model.eval()
    return model


def _kind_label(kind: str) -> str:
    return {"upscaler": "upscaling", "gfpgan": "GFPGAN face restoration", "codeformer": "CodeFormer face restoration"}[kind]


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."


def model_dtype(policy, model, kind: str = "upscaler") -> torch.dtype:
    """The dtype to run a post-processing model in: the policy's reduced precision where it is safe and fast.

    On CUDA the policy gives float16 (unless --no-half / --precision full); an architecture without float16
    support (GFPGAN, CodeFormer) gets bfloat16 where the GPU has it, else float32. On the CPU, upscalers follow
    the policy's bfloat16 (only given on CPUs with bf16 hardware; run channels-last); the face models stay in
    float32 there, as their modulated and grouped convolutions have no fast bfloat16 CPU kernels.
    """
    want = policy.dtype
    on_cuda = policy.device.type == "cuda"
    bf16_ok = model.supports_bfloat16 and (not on_cuda or torch.cuda.is_bf16_supported())
    if want == torch.float16 and on_cuda:
        if model.supports_half:
            return torch.float16
        return torch.bfloat16 if bf16_ok else torch.float32
    if want == torch.bfloat16 and bf16_ok and (on_cuda or kind == "upscaler"):
        return torch.bfloat16
    return torch.float32


@dataclass
class LoadedModel:
    model: object  # spandrel ImageModelDescriptor, on `device` in `dtype`
    path: Path
    kind: str
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.bfloat16

    @property
    def architecture(self) -> str:
        return self.model.architecture.name

    @property
    def scale(self) -> int:
        return int(self.model.scale)


class PostprocessModelCache:
    """Least-recently-used cache of loaded post-processing models, placed by the device policy of their part.

    `--use-cpu esrgan|gfpgan|codeformer|all` puts that part on the CPU. With `--medvram`/`--lowvram` a model goes
    back to RAM after each use (`release`), leaving the GPU to the Stable Diffusion model.
    """

    def __init__(self, policies: dict, limit: int = 4):
        self.policies = policies
        self.limit = limit
        self.models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self.loads = 0

    def get(self, path: Path, kind: str) -> LoadedModel:
        path = Path(path).resolve()
        if not path.is_file():
            raise UserError(f"Model file not found: {path}", status=404)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, kind)
        entry = self.models.get(key)
        if entry is None:
            t0 = time.perf_counter()
            model = load_model(path, kind)
            self.loads += 1
            entry = LoadedModel(model=model, path=path, kind=kind, device=torch.device("cpu"), dtype=torch.float32)
            log.info("loaded %s (%s, x%d) in %.1f s", path.name, entry.architecture, entry.scale, time.perf_counter() - t0)
            self.models[key] = entry
        self.models.move_to_end(key)
        policy = self.policies[DEVICE_PART[kind]]
        dtype = model_dtype(policy, entry.model, kind)
        if entry.device != policy.device or entry.dtype != dtype:
            entry.model.to(policy.device)
            entry.model.to(dtype)
            entry.device, entry.dtype = policy.device, dtype
            # oneDNN's bfloat16 convolutions are only fast in channels-last layout
            layout = torch.channels_last if entry.channels_last else torch.contiguous_format
            entry.model.model.to(memory_format=layout)
        while len(self.models) > max(1, self.limit):
            _, old = self.models.popitem(last=False)
            log.info("evicted %s from the post-processing model cache", old.name)
        return entry

    def release(self) -> None:
        """After a job: with an offloading policy, move the models back to RAM."""
        for entry in self.models.values():
            policy = self.policies[DEVICE_PART[entry.kind]]
            if policy.offloads and entry.device.type != "cpu":
                entry.model.to(torch.device("cpu"))
                entry.device = torch.device("cpu")

    def clear(self) -> None:
        self.models.clear()
        import gc
        gc.collect()

    def cached(self) -> list[str]:
        return [entry.name for entry in self.models.values()]
