"""DeepDanbooru tagging as A1111's "Interrogate DeepBooru": the file, the network's scores, the tags as text.

The model is A1111's `model-resnet_custom_v3.pt` in `models/torch_deepdanbooru` (any `.pt` there), downloaded
from A1111's TorchDeepDanbooru release on first use. The picture is resized and filled to 512x512 (A1111's
resize mode 2), every tag scoring at least `interrogate_deepbooru_score_threshold` is kept (the `rating:` ones
never), sorted by score or alphabetically (`deepbooru_sort_alpha`), the `deepbooru_filter_tags` left out, and
written with spaces (`deepbooru_use_spaces`), escaped brackets (`deepbooru_escape`) and their scores
(`interrogate_return_ranks`: `(tag:0.912)`), joined by ", ".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

FOLDER = "torch_deepdanbooru"
FILE_NAME = "model-resnet_custom_v3.pt"
URL = "https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt"
INPUT_SIZE = 512
_SPECIAL = re.compile(r"([\\()])")


def find_model_file(folder: Path) -> Path | None:
    """A1111's file in `folder`, else the first other `.pt` file there (A1111 takes any)."""
    if (folder / FILE_NAME).is_file():
        return folder / FILE_NAME
    files = sorted(p for p in folder.glob("*.pt") if p.is_file()) if folder.is_dir() else []
    return files[0] if files else None


def load_model(path: Path):
    """The network of a DeepDanbooru file, read with `weights_only` (tensors, the tag list: nothing else)."""
    from backend.core.errors import UserError
    from backend.engine.interrogate.deepbooru_model import build_from_state_dict
    from backend.engine.state_dict_io import load_pickle

    state = load_pickle(path)
    if not isinstance(state, Mapping):
        raise UserError(f"{path.name} does not hold a state dict (found {type(state).__name__}); it is not a "
                        f"DeepDanbooru model file.")
    return build_from_state_dict(dict(state), path.name)


def scores(model, image: Image.Image, device, dtype) -> list[float]:
    """Each tag's probability for `image` (the model's `tags` order)."""
    import numpy as np
    import torch

    from backend.engine.image_ops import resize_image

    picture = resize_image(2, image.convert("RGB"), INPUT_SIZE, INPUT_SIZE)
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
    with torch.inference_mode():
        y = model(x.to(device, dtype))[0]
    return y.float().cpu().tolist()


def tags_text(tags: Sequence[str], probabilities: Sequence[float], options: Mapping, ranks: bool | None = None) -> str:
    """The caption A1111 makes of the scores under the job's settings (see the module docstring)."""
    threshold = float(options["interrogate_deepbooru_score_threshold"])
    kept = {tag: p for tag, p in zip(tags, probabilities) if p >= threshold and not tag.startswith("rating:")}
    if options["deepbooru_sort_alpha"]:
        order = sorted(kept)
    else:
        order = [tag for tag, _ in sorted(kept.items(), key=lambda item: -item[1])]
    dropped = {t.strip().replace(" ", "_") for t in str(options["deepbooru_filter_tags"]).split(",")}
    ranks = options["interrogate_return_ranks"] if ranks is None else ranks
    parts = []
    for tag in order:
        if tag in dropped:
            continue
        text = tag.replace("_", " ") if options["deepbooru_use_spaces"] else tag
        if options["deepbooru_escape"]:
            text = _SPECIAL.sub(r"\\\1", text)
        parts.append(f"({text}:{kept[tag]:.3f})" if ranks else text)
    return ", ".join(parts)
