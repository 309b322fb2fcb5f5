"""Where things live on disk: the AUTOMATIC1111 folder layout under the data dir.

Built once from the flags and passed to what needs it. `resolve_inside` is the one
check every path that comes from a request goes through.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.errors import UserError

MODEL_FOLDERS = {
    "Stable-diffusion": "Put Stable Diffusion checkpoints here.txt",
    "VAE": "Put VAE here.txt",
    "text_encoder": "Put text encoders (CLIP-L, CLIP-G, T5-XXL) for FLUX.1 and SD3 here.txt",
    "clip": "Put text encoders (CLIP-L, CLIP-G, T5-XXL) here, as ComfyUI keeps them.txt",
    "Lora": "Put LoRA files here.txt",
    "LyCORIS": "Put LyCORIS files here.txt",
    "ControlNet": "Put ControlNet models here.txt",
    "ControlNet-annotators": "Put ControlNet annotator (preprocessor) weights here.txt",
    "ESRGAN": "Put ESRGAN models here.txt",
    "RealESRGAN": "Put RealESRGAN models here.txt",
    "GFPGAN": "Put GFPGAN models here.txt",
    "Codeformer": "Put CodeFormer models here.txt",
    "SwinIR": "Put SwinIR models here.txt",
    "DAT": "Put DAT models here.txt",
    "facexlib": "Put facexlib face detection weights here.txt",
    "hypernetworks": "Put hypernetworks here.txt",
    "VAE-taesd": "Put TAESD models here.txt",
}

PROGRAM_DIR = Path(__file__).resolve().parents[2]  # the folder holding app.py (backend/core/ is two below it)
PROGRAM_FOLDERS = ("backend", "api", "ui", "extensions", ".git")

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantized FLUX.1 / SD3 transformers
VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
# the files of "VAE / Text Encoder" (Forge's list: models/VAE, models/text_encoder and models/clip)
PART_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".gguf")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class DataPaths:
    data_dir: Path
    models_dir: Path
    ckpt_dirs: list[Path] = field(default_factory=list)
    vae_dirs: list[Path] = field(default_factory=list)
    text_encoder_dirs: list[Path] = field(default_factory=list)  # models/text_encoder, models/clip (+ --text-encoder-dir)
    embeddings_dir: Path | None = None
    lora_dirs: list[Path] = field(default_factory=list)
    hypernetwork_dirs: list[Path] = field(default_factory=list)
    controlnet_dirs: list[Path] = field(default_factory=list)
    esrgan_dirs: list[Path] = field(default_factory=list)
    realesrgan_dirs: list[Path] = field(default_factory=list)
    gfpgan_dirs: list[Path] = field(default_factory=list)
    codeformer_dirs: list[Path] = field(default_factory=list)
    outputs_dir: Path | None = None
    config_file: Path | None = None
    cache_dir: Path | None = None
    ui_config_file: Path | None = None  # --ui-config-file: the UI controls' defaults and limits (ui/ui_config.py)
    styles_files: list[str] = field(default_factory=list)  # --styles-file values (globs allowed), in order

    @classmethod
    def from_args(cls, args) -> "DataPaths":
        data_dir = Path(args.data_dir).expanduser().resolve()
        models_dir = Path(args.models_dir).expanduser().resolve() if args.models_dir else data_dir / "models"

        def with_extra(default: Path, extra: str | None) -> list[Path]:
            dirs = [default]
            if extra:
                p = Path(extra).expanduser().resolve()
                if p not in dirs:
                    dirs.append(p)
            return dirs

        return cls(
            data_dir=data_dir,
            models_dir=models_dir,
            ckpt_dirs=with_extra(models_dir / "Stable-diffusion", args.ckpt_dir),
            vae_dirs=with_extra(models_dir / "VAE", args.vae_dir),
            text_encoder_dirs=with_extra(models_dir / "text_encoder", getattr(args, "text_encoder_dir", None))
            + [models_dir / "clip"],
            embeddings_dir=Path(args.embeddings_dir).expanduser().resolve() if args.embeddings_dir else data_dir / "embeddings",
            lora_dirs=with_extra(models_dir / "Lora", args.lora_dir) + [models_dir / "LyCORIS"],
            hypernetwork_dirs=with_extra(models_dir / "hypernetworks", getattr(args, "hypernetwork_dir", None)),
            controlnet_dirs=with_extra(models_dir / "ControlNet", args.controlnet_dir),
            esrgan_dirs=with_extra(models_dir / "ESRGAN", getattr(args, "esrgan_models_path", None)),
            realesrgan_dirs=with_extra(models_dir / "RealESRGAN", getattr(args, "realesrgan_models_path", None)),
            gfpgan_dirs=with_extra(models_dir / "GFPGAN", getattr(args, "gfpgan_models_path", None)),
            codeformer_dirs=with_extra(models_dir / "Codeformer", getattr(args, "codeformer_models_path", None)),
            outputs_dir=data_dir / "outputs",
            config_file=Path(args.ui_settings_file).expanduser().resolve() if args.ui_settings_file else data_dir / "config.json",
            ui_config_file=(Path(args.ui_config_file).expanduser().resolve() if getattr(args, "ui_config_file", None)
                            else data_dir / "ui-config.json"),
            cache_dir=data_dir / "cache",
            styles_files=list(getattr(args, "styles_file", None) or []) or [str(data_dir / "styles.csv")],
        )

    def model_folders(self) -> list[Path]:
        """Every folder that holds model files: DATA_DIR/models, the models folder and each model folder the flags
        name, and the embeddings folder. Jobs never write into them (`check_output_folder`)."""
        folders = [self.data_dir / "models", self.models_dir, *self.ckpt_dirs, *self.vae_dirs, *self.text_encoder_dirs,
                   *self.lora_dirs, *self.hypernetwork_dirs,
                   *self.controlnet_dirs, *self.esrgan_dirs, *self.realesrgan_dirs, *self.gfpgan_dirs,
                   *self.codeformer_dirs]
        if self.embeddings_dir is not None:
            folders.append(self.embeddings_dir)
        unique: list[Path] = []
        for folder in folders:
            resolved = Path(folder).expanduser().resolve()
            if resolved not in unique:
                unique.append(resolved)
        return unique

    def check_output_folder(self, path: Path, what: str = "Output") -> Path:
        """Refuse (403) an output folder inside a model folder or the program's own code: a job's files must never
        land beside checkpoints, LoRAs or embeddings (where they would be read as models) or in code folders."""
        resolved = Path(path).expanduser().resolve()
        protected = [(folder, "a model folder") for folder in self.model_folders()]
        protected += [(PROGRAM_DIR / name, "the program's own files") for name in PROGRAM_FOLDERS]
        for folder, kind in protected:
            if resolved == folder or folder in resolved.parents:
                raise UserError(f"{what} folder {resolved} is inside {kind} ({folder}); Easel does not write there. "
                                f"Choose a folder outside it (for example under {self.outputs_dir}).", status=403)
        return resolved

    def ensure_folders(self) -> None:
        """Create the A1111 folder layout with the 'Put ... here' notes, as A1111 does."""
        for name, note in MODEL_FOLDERS.items():
            folder = self.models_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / note
            if not marker.exists():
                marker.write_text("")
        for d in (self.embeddings_dir, self.outputs_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)


def resolve_inside(path: str | os.PathLike, allowed_roots: list[Path], what: str = "path") -> Path:
    """Resolve `path` (following symlinks) and require it to lie inside one of `allowed_roots`."""
    resolved = Path(path).expanduser().resolve()
    for root in allowed_roots:
        root = root.resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    raise UserError(f"The {what} {str(path)!r} is outside the folders Easel may use.", status=403)


def list_files(folders: list[Path], extensions: tuple[str, ...]) -> list[Path]:
    """All files below `folders` (recursively) with one of `extensions`, sorted by name, no duplicates."""
    seen: set[Path] = set()
    found: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if name.lower().endswith(extensions):
                    p = Path(root, name).resolve()
                    if p not in seen:
                        seen.add(p)
                        found.append(p)
    return sorted(found, key=lambda p: str(p).lower())
