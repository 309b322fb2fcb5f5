"""Model-based ControlNet preprocessors ("annotators"): one module per network, with its weights and post-processing.

The package holds (network definitions written here, loading the public weight files sd-webui-controlnet
uses; key names follow those files):
- `hed`: `softedge_hed` (internal name `hed`), `softedge_hedsafe` (`hed_safe`), `scribble_hed`: HED soft
  edges, `ControlNetHED.pth` (ControlNet 1.1's Apache-2.0 HED);
- `lineart`: `lineart_realistic` (`lineart`) and `lineart_coarse`: the line generator, `sk_model.pth` / `sk_model2.pth`;
- `lineart_anime`: `lineart_anime`, a pix2pix U-Net, `netG.pth`;
- `openpose`: `openpose` (body only): the CMU body pose network, `body_pose_model.pth`, with part-affinity-field
  assembly of people and ControlNet's OpenPose drawing;
- `mlsd`: `mlsd`, M-LSD large straight lines, `mlsd_large_512_fp32.pth`;
- `depth_anything`: `depth_anything`, DINOv2 ViT + DPT head, `depth_anything_vitl14.pth` (sized from the file);
- `normal_bae`: `normal_bae`, EfficientNet-B5 + refinement decoder surface normals, `scannet.pt`;
- `uniformer`: `seg_ufade20k` (`segmentation`), UniFormer-S + UperNet ADE20K segmentation,
  `upernet_global_small.pth`, painted in the ADE20K palette;
- `common`: what they share: `WeightFile`, `AnnotatorEnv` (finding, downloading and loading weights), helpers.

Each network module maps its preprocessors' names to their functions in `RUNNERS`; `RUNNERS` here is all of
them. Their names, sliders and weight files are data in the torch-free catalog the app lists
(`backend.core.preprocessor_catalog`). To add an annotator: write its module (network, weight file, preprocessor
functions, `RUNNERS`), add it to `RUNNERS` here, and its entry to the catalog.

Weights are looked for in `models/ControlNet-annotators/` (also in a sub-folder named after the
annotator, as sd-webui-controlnet's `annotator/downloads/<name>/` lays them out). When missing,
they are downloaded on first use with a progress bar; offline, a `UserError` names the missing
file, where it comes from, and where to put it. Files load with `torch.load(weights_only=True)`.
Importing the package does not import torch; the networks import it when they are built.
"""
from __future__ import annotations

from typing import Callable

from backend.engine.controlnet.annotators import (depth_anything, hed, lineart, lineart_anime, mlsd, normal_bae,
                                                  openpose, uniformer)
from backend.engine.controlnet.annotators.common import AnnotatorEnv, WeightFile

# name -> (run, run with poses or None): the model-based entries of `backend.core.preprocessor_catalog`.
RUNNERS: dict[str, tuple[Callable, Callable | None]] = {
    **hed.RUNNERS, **lineart.RUNNERS, **lineart_anime.RUNNERS, **openpose.RUNNERS, **mlsd.RUNNERS,
    **depth_anything.RUNNERS, **normal_bae.RUNNERS, **uniformer.RUNNERS,
}

# Every network's weight file.
WEIGHT_FILES: tuple[WeightFile, ...] = tuple(
    value for module in (hed, lineart, lineart_anime, openpose, mlsd, depth_anything, normal_bae, uniformer)
    for value in vars(module).values() if isinstance(value, WeightFile))

__all__ = ["RUNNERS", "WEIGHT_FILES", "AnnotatorEnv", "WeightFile", "depth_anything", "hed", "lineart", "lineart_anime", "mlsd",
           "normal_bae", "openpose", "uniformer"]
