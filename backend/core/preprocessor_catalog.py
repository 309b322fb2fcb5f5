"""The ControlNet preprocessors as data: names, aliases, sliders, control types, the weights they need.

Torch-free, for both processes: the app lists them (UI, `/controlnet/module_list`, `/controlnet/control_types`)
and refuses unknown names before a job is queued; the backend runs them by name
(`backend.engine.controlnet.preprocessors` for those that need no weights, `annotators` for the others).

Names are sd-webui-controlnet's internal module names (`canny`, `invert`, `color`, ...); the display names
it also accepts (`invert (from white bg & black line)`, `t2ia_color_grid`, ...) are aliases.
"""
from __future__ import annotations

from dataclasses import dataclass

from backend.core.errors import UserError


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor as listed; the backend runs it by `name` (an RGB uint8 image in, the control map out)."""

    name: str
    resolution: Slider | None = None
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    model_free: bool = True
    aliases: tuple[str, ...] = ()
    image_like: bool = False  # the map is a picture (filled with its border colour by "Resize and Fill")
    control_type: str = "All"
    weights: tuple[str, ...] = ()  # annotator files it needs
    # The map is the picture with its masked pixels marked -1 (ControlNet 1.1 inpaint): needs the unit's mask,
    # the control image's transparent pixels, or the img2img inpaint mask.
    uses_mask: bool = False
    finds_poses: bool = False  # also answers the OpenPose JSON of the people found (/controlnet/detect)

    @property
    def display_name(self) -> str:
        return self.aliases[0] if self.aliases else self.name

    def sliders(self) -> list[dict]:
        return [s.as_dict() for s in (self.resolution, self.threshold_a, self.threshold_b) if s is not None]

    def defaults(self) -> tuple[int, float, float]:
        return (int(self.resolution.value) if self.resolution else 512,
                float(self.threshold_a.value) if self.threshold_a else -1.0,
                float(self.threshold_b.value) if self.threshold_b else -1.0)

    def arguments(self, resolution, threshold_a, threshold_b) -> tuple[int, float, float]:
        """The values it runs with; -1 (or None) means its default."""
        d_res, d_a, d_b = self.defaults()
        res = int(resolution) if resolution is not None and resolution > 0 else d_res
        a = float(threshold_a) if threshold_a is not None and threshold_a != -1 else d_a
        b = float(threshold_b) if threshold_b is not None and threshold_b != -1 else d_b
        return max(64, min(4096, res)), a, b


RES = Slider("Preprocessor Resolution", 512, 64, 2048, 8)


def _annotator(name: str, control_type: str, weights: str, *sliders: Slider, **kw) -> Preprocessor:
    """A model-based preprocessor (an annotator network with a weight file in models/ControlNet-annotators)."""
    return Preprocessor(name, RES, *sliders, model_free=False, control_type=control_type, weights=(weights,), **kw)


# Those that need no weights (numpy), then the annotators, in sd-webui-controlnet's order.
PREPROCESSORS: list[Preprocessor] = [
    Preprocessor("none", image_like=True),
    Preprocessor("invert", aliases=("invert (from white bg & black line)",), control_type="Lineart"),
    Preprocessor("canny", RES, Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255),
                 control_type="Canny"),
    Preprocessor("binary", RES, Slider("Binary threshold", 0, 0, 255), control_type="Scribble"),
    Preprocessor("threshold", RES, Slider("Binarization Threshold", 127, 0, 255), control_type="Scribble"),
    Preprocessor("scribble_xdog", RES, Slider("XDoG Threshold", 32, 1, 64), control_type="Scribble"),
    Preprocessor("blur_gaussian", RES, Slider("Sigma", 9.0, 0.01, 64.0, 0.01), image_like=True, control_type="Tile"),
    Preprocessor("tile_resample", None, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), image_like=True,
                 control_type="Tile"),
    Preprocessor("shuffle", RES, image_like=True, control_type="Shuffle"),
    Preprocessor("color", RES, aliases=("t2ia_color_grid",), image_like=True, control_type="T2I-Adapter"),
    Preprocessor("lineart_standard", RES, aliases=("lineart_standard (from white bg & black line)",),
                 control_type="Lineart"),
    Preprocessor("inpaint", aliases=("inpaint_global_harmonious",), image_like=True, control_type="Inpaint",
                 uses_mask=True),
    Preprocessor("inpaint_only", image_like=True, control_type="Inpaint", uses_mask=True),
    _annotator("hed", "SoftEdge", "ControlNetHED.pth", aliases=("softedge_hed",)),
    _annotator("hed_safe", "SoftEdge", "ControlNetHED.pth", aliases=("softedge_hedsafe",)),
    _annotator("scribble_hed", "Scribble", "ControlNetHED.pth"),
    _annotator("lineart", "Lineart", "sk_model.pth", aliases=("lineart_realistic",)),
    _annotator("lineart_coarse", "Lineart", "sk_model2.pth"),
    _annotator("lineart_anime", "Lineart", "netG.pth"),
    _annotator("openpose", "OpenPose", "body_pose_model.pth", finds_poses=True),
    _annotator("mlsd", "MLSD", "mlsd_large_512_fp32.pth", Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
               Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01)),
    _annotator("depth_anything", "Depth", "depth_anything_vitl14.pth"),
    _annotator("normal_bae", "NormalMap", "scannet.pt"),
    _annotator("segmentation", "Segmentation", "upernet_global_small.pth", aliases=("seg_ufade20k",)),
]


def all_preprocessors() -> list[Preprocessor]:
    return list(PREPROCESSORS)


def find_preprocessor(name: str | None) -> Preprocessor:
    """A preprocessor by internal name or display name (case-insensitive); None/"" mean "none"."""
    wanted = (name or "none").strip().lower()
    for p in PREPROCESSORS:
        if wanted == p.name.lower() or wanted in (a.lower() for a in p.aliases):
            return p
    names = ", ".join(p.name for p in PREPROCESSORS)
    raise UserError(f"Unknown ControlNet preprocessor {name!r}. Available: {names}")
