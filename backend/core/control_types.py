"""sd-webui-controlnet's "Control Type" filter: which preprocessors and models each type offers.

Torch-free. The types are sd-webui-controlnet 1.1.4xx's radio labels, limited to those whose preprocessors are in
Easel's catalog (`backend.core.preprocessor_catalog`); "All" lists everything. A type's models are the model titles
whose name contains the type's pattern or one of its aliases, as sd-webui-controlnet matches them; union models
("union" in the name) belong to every type their control modes cover.
"""
from __future__ import annotations

from backend.core.preprocessor_catalog import all_preprocessors

# sd-webui-controlnet's label for the catalog's `control_type` where the two differ.
_LABELS = {"Scribble": "Scribble/Sketch", "Tile": "Tile/Blur"}
# sd-webui-controlnet's order of the radio.
_ORDER = ["All", "Canny", "Depth", "NormalMap", "OpenPose", "MLSD", "Lineart", "SoftEdge", "Scribble/Sketch",
          "Segmentation", "Shuffle", "Tile/Blur", "Inpaint", "InstructP2P", "Reference", "Recolor", "Revision",
          "T2I-Adapter", "IP-Adapter"]
# The preprocessor a type selects (sd-webui-controlnet's default where the catalog has it, else the catalog's nearest).
_DEFAULT_MODULE = {"Canny": "canny", "Depth": "depth_anything", "NormalMap": "normal_bae", "OpenPose": "openpose",
                   "MLSD": "mlsd", "Lineart": "lineart_standard", "SoftEdge": "hed", "Scribble/Sketch": "scribble_hed",
                   "Segmentation": "segmentation", "Shuffle": "shuffle", "Tile/Blur": "tile_resample",
                   "Inpaint": "inpaint_only", "T2I-Adapter": "color"}
# Other words that mark a model file as of the type (besides the lower-cased label).
_MODEL_ALIASES = {"Segmentation": ("seg",), "NormalMap": ("normal",), "T2I-Adapter": ("t2i_adapter", "t2iadapter", "t2ia"),
                  "Scribble/Sketch": ("scribble", "sketch"), "Tile/Blur": ("tile", "blur"), "OpenPose": ("openpose", "densepose")}
# Types a union ControlNet (one model for several types, e.g. FLUX.1-dev-ControlNet-Union: a title with "union")
# serves: those whose preprocessors name one of its control modes.
_UNION_TYPES = ("Canny", "Depth", "Tile/Blur", "OpenPose")
# Types whose list also offers the "invert" preprocessor (line drawings on a white background).
_WITH_INVERT = ("Canny", "Lineart", "Scribble/Sketch", "MLSD")


def label_of(control_type: str) -> str:
    return _LABELS.get(control_type, control_type)


def control_type_names() -> list[str]:
    """"All" and the types the catalog has preprocessors for, in sd-webui-controlnet's order."""
    present = {label_of(p.control_type) for p in all_preprocessors()}
    return [t for t in _ORDER if t == "All" or t in present]


def modules_for(control_type: str) -> list[str]:
    """The preprocessor names a type offers: "none", its own, and "invert" for line-drawing types; all for "All"."""
    names = [p.name for p in all_preprocessors()]
    if control_type == "All":
        return names
    if control_type not in control_type_names():
        raise ValueError(f"unknown control type {control_type!r}")
    own = [p.name for p in all_preprocessors() if label_of(p.control_type) == control_type]
    if control_type in _WITH_INVERT and "invert" not in own:
        own.append("invert")
    return ["none"] + [n for n in names if n in own]


def default_module(control_type: str) -> str:
    if control_type == "All":
        return "none"
    modules = modules_for(control_type)
    wanted = _DEFAULT_MODULE.get(control_type)
    return wanted if wanted in modules else modules[1 if len(modules) > 1 else 0]


def model_matches(control_type: str, title: str) -> bool:
    """Whether a model title belongs to a type ("None" belongs to every type)."""
    if control_type == "All" or title == "None":
        return True
    name = title.lower()
    if "union" in name and control_type in _UNION_TYPES:
        return True
    patterns = (control_type.lower(),) + _MODEL_ALIASES.get(control_type, ())
    return any(p in name for p in patterns)


def models_for(control_type: str, titles: list[str]) -> list[str]:
    """`titles` filtered to the type, keeping their order ("None" first when present)."""
    return [t for t in titles if model_matches(control_type, t)]


def default_model(control_type: str, titles: list[str]) -> str:
    """The first model of the type present ("None" when there is none, and for "All")."""
    if control_type == "All":
        return "None"
    found = [t for t in models_for(control_type, titles) if t != "None"]
    return found[0] if found else "None"
