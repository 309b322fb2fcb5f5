"""CLIP ranking as A1111's "Interrogate CLIP" does it: OpenAI's CLIP ViT-L/14 picks, for each category file, the
lines that best describe the picture, appended to the BLIP caption.

The model is OpenAI's `ViT-L-14.pt` (a TorchScript archive) in `models/CLIP`, downloaded from OpenAI on first use.
Its parameters are read with `torch.jit.load` (TorchScript's own reader: no pickled Python code runs) and built into
open_clip's CLIP, whose sizes it takes from the tensors' shapes, so any OpenAI ViT file loads. The picture is
resized (shorter side), centre-cropped and normalised as OpenAI's preprocessing does; texts are tokenized with
OpenAI's BPE (truncated to 77 tokens).

Categories: the `.txt` files of `models/interrogate` (A1111 downloads artists, flavors, mediums and movements from
the clip-interrogator project when the folder is missing), one phrase a line; a file `name.topN.txt` gives its N best
lines (default 1). `interrogate_clip_dict_limit` ranks only a file's first lines (0: all),
`interrogate_clip_skip_categories` leaves files out by name, `interrogate_return_ranks` writes `(line:0.123)` with
the line's share of the softmax over its file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.core.errors import UserError

FOLDER = "CLIP"
FILE_NAME = "ViT-L-14.pt"
URL = ("https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/"
       "ViT-L-14.pt")
CATEGORY_FOLDER = "interrogate"
CATEGORY_TYPES = ("artists", "flavors", "mediums", "movements")
CATEGORY_URL = "https://raw.githubusercontent.com/pharmapsychotic/clip-interrogator/main/clip_interrogator/data/{}.txt"
TEXT_BATCH = 256
_TOPN = re.compile(r"\.top(\d+)$")


@dataclass(frozen=True)
class Category:
    name: str  # the file's name without .txt ("flavors.top3")
    topn: int
    items: tuple[str, ...]


def find_model_file(folder: Path) -> Path | None:
    path = folder / FILE_NAME
    return path if path.is_file() else None


def read_categories(folder: Path, skip: list[str] | tuple[str, ...] = ()) -> list[Category]:
    """The category files of `folder`, by name, without those named in `skip` (with or without .topN)."""
    skipped = {name.strip() for name in skip}
    found = []
    for path in sorted(folder.glob("*.txt")):
        name = path.name[:-len(".txt")]
        m = _TOPN.search(name)
        if name in skipped or (m and name[:m.start()] in skipped):
            continue
        items = tuple(line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
        found.append(Category(name, int(m.group(1)) if m else 1, tuple(i for i in items if i)))
    return found


def load_model(path: Path):
    """open_clip's CLIP with the parameters of an OpenAI CLIP file (TorchScript archive), in float32."""
    import warnings

    from open_clip.model import build_model_from_openai_state_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        state = {k: v.detach().float() for k, v in archive.state_dict().items()}
        del archive
    except Exception as exc:  # noqa: BLE001  not a TorchScript archive, or a damaged one
        raise UserError(f"Could not read {path.name} as OpenAI's CLIP model file (a TorchScript archive): "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}. Delete it and "
                        f"download it again.") from exc
    if "visual.proj" not in state or "token_embedding.weight" not in state:
        raise UserError(f"{path.name} is not an OpenAI CLIP ViT model (it lacks visual.proj or token_embedding).")
    try:
        model = build_model_from_openai_state_dict(state, quick_gelu=True, cast_dtype=None)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path.name} does not fit OpenAI's CLIP ViT architecture "
                        f"({str(exc).splitlines()[0][:200]}).") from exc
    return model.float().eval().requires_grad_(False)


def image_features(model, image, device, dtype) -> torch.Tensor:
    from open_clip.transform import image_transform

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = image_transform(size, is_train=False)(image.convert("RGB"))[None].to(device, dtype)
    with torch.inference_mode():
        features = model.encode_image(x).float()
    return features / features.norm(dim=-1, keepdim=True)


def rank(model, features: torch.Tensor, items: tuple[str, ...], topn: int, limit: int, device, dtype,
         stop=lambda: None) -> list[tuple[str, float]]:
    """The `topn` best lines of `items` (its first `limit` when limit > 0) with their softmax share (0-1)."""
    import open_clip

    items = items[:limit] if limit > 0 else items
    if not items:
        return []
    texts = []
    for start in range(0, len(items), TEXT_BATCH):
        stop()
        tokens = open_clip.tokenize(list(items[start:start + TEXT_BATCH])).to(device)
        with torch.inference_mode():
            batch = model.encode_text(tokens).float()
        texts.append(batch / batch.norm(dim=-1, keepdim=True))
    similarity = (100.0 * features @ torch.cat(texts).T).softmax(dim=-1).mean(dim=0)
    top = similarity.cpu().topk(min(topn, len(items)))
    return [(items[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
