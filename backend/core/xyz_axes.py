"""The X/Y/Z plot's axes and its `script_args`, parsed into a plan before any image is made (torch-free).

AUTOMATIC1111 (1.10) addresses an axis type by its index in the axis list shown for the tab (txt2img leaves out
the img2img-only axes and the other way round), so `AXES` keeps A1111's list in A1111's order, the axes Easel
cannot apply included: choosing one of those is refused with a clear "not supported in Easel" message instead of
shifting the indices of the others.

``xyz_axes(is_img2img, extra)``
    The tab's axis list (what the X/Y/Z type dropdowns show; ``script_args`` index into it): A1111's, then the
    axes the enabled extensions add (`extra`, e.g. ControlNet's "[ControlNet] Weight"), as A1111 appends them.
``parse_xyz_args(script_args, request, catalogs, *, is_img2img, max_images)``
    A1111's positional arguments (`XYZ_ARG_NAMES`) -> `XYZPlan`, or a `UserError` naming the axis and the value.
``cell_request(request, cell)``
    The base request with one cell's axis values applied (what the runner generates; the parser checks each value
    this way too, so a value the request checks refuse is refused before the first image).
``xyz_arg_specs(is_img2img)``
    The script's controls as the scripts catalog's `ScriptArg`s, for ``/sdapi/v1/script-info`` and the UI.

Value syntax as A1111: comma-separated (CSV, so ``"a, b", c`` is two values), integer and float ranges
``1-5``, ``1-5 (+2)``, ``10-1 (-3)``, ``1-10 [5]`` (five values evenly spaced), Prompt S/R (the first value is
searched for in the prompt and replaced by each value), Prompt order (every permutation of the values), and
dropdown-valued axes (sampler, schedule type, checkpoint, VAE, hires upscaler) resolved against catalogs.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field as _field, replace
from itertools import chain, permutations
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from backend.core.errors import UserError
from backend.core.options import RANDN_SOURCES, SETTINGS_BY_KEY, coerce
from backend.core.request_checks import LATENT_UPSCALE_MODES, check_img2img, check_txt2img
from backend.core.sampler_catalog import (SAMPLERS, SCHEDULERS, find_sampler, find_scheduler,
                                          split_sampler_and_schedule)

SCRIPT_TITLE = "X/Y/Z plot"

# Kinds of values an axis takes.
NOTHING, INT, FLOAT, TEXT, PERMUTATIONS = "nothing", "int", "float", "text", "permutations"
# How a value is written in the legend (A1111's format_value_add_label / format_value / ...).
WITH_LABEL, VALUE_ONLY, JOINED, BLANK, BASENAME = "label", "value", "joined", "blank", "basename"
# Catalog-checked axes (their values come from a dropdown unless csv_mode).
SAMPLER, SCHEDULE, CHECKPOINT, VAE, HIRES_UPSCALER, STYLES, BOOLEAN, FACE_RESTORE, RNG_SOURCE = (
    "sampler", "schedule", "checkpoint", "vae", "hires_upscaler", "styles", "boolean", "face_restore", "rng_source")
REFINER = "refiner"  # a checkpoint, or "None" (no refiner)

MAX_VALUES_PER_AXIS = 1000  # a range or permutation list longer than this is refused before it is built
DEFAULT_MAX_GRID_MEGAPIXELS = 200  # A1111's img_max_size_mp


@dataclass(frozen=True)
class AxisType:
    """One entry of A1111's axis list.

    `field`: the request field the value sets; `setting`: the override_settings key it sets instead;
    `tab`: None for both tabs, else "txt2img" or "img2img" only; `cost`: how slow changing it is (the costliest
    axis runs outermost, so a checkpoint loads once per value); `choices`: the catalog a value is resolved against;
    `unsupported`: why Easel cannot apply it (choosing it is refused with that reason).

    An extension's axis (after A1111's, as the extensions append theirs to A1111's list; ControlNet's
    "[ControlNet] Weight", ...) changes an always-on script's entry of the request instead: `script` names it (the
    `alwayson_scripts` key), `apply(alwayson_scripts, value)` returns the request's `alwayson_scripts` with the value
    applied (a new dict; run in the app process only), `options()` the choices of a dropdown axis. The app parses
    each cell's entry as a job's (its extension's checks) and the engine prepares the cell's script from it.
    """
    label: str
    kind: str
    field: str | None = None
    setting: str | None = None
    tab: str | None = None
    cost: float = 0.0
    choices: str | None = None
    legend: str = WITH_LABEL
    unsupported: str | None = None
    script: str | None = None
    apply: Callable[[dict, Any], dict] | None = _field(default=None, compare=False)
    options: Callable[[], Sequence[str]] | None = _field(default=None, compare=False)

    def portable(self) -> "AxisType":
        """This axis type without its app-side functions (what the engine process receives)."""
        return replace(self, apply=None, options=None) if self.apply or self.options else self


def _no(label: str, kind: str, reason: str, *, tab: str | None = None, choices: str | None = None) -> AxisType:
    return AxisType(label, kind, tab=tab, choices=choices, unsupported=reason)


_SCHED_OPT = "the schedule's sigma range and rho settings are not implemented"

# AUTOMATIC1111 1.10's axis_options, in its order (txt2img-only and img2img-only entries marked by `tab`).
AXES: tuple[AxisType, ...] = (
    AxisType("Nothing", NOTHING, legend=BLANK),
    AxisType("Seed", INT, field="seed"),
    AxisType("Var. seed", INT, field="subseed"),
    AxisType("Var. strength", FLOAT, field="subseed_strength"),
    AxisType("Steps", INT, field="steps"),
    AxisType("Hires steps", INT, field="hr_second_pass_steps", tab="txt2img"),
    AxisType("CFG Scale", FLOAT, field="cfg_scale"),
    _no("Image CFG Scale", FLOAT, "it is used only by instruct-pix2pix checkpoints, which Easel does not support",
        tab="img2img"),
    AxisType("Prompt S/R", TEXT, legend=VALUE_ONLY),
    AxisType("Prompt order", PERMUTATIONS, legend=JOINED),
    AxisType("Sampler", TEXT, field="sampler_name", tab="txt2img", choices=SAMPLER, legend=VALUE_ONLY),
    AxisType("Hires sampler", TEXT, field="hr_sampler_name", tab="txt2img", choices=SAMPLER),
    AxisType("Sampler", TEXT, field="sampler_name", tab="img2img", choices=SAMPLER, legend=VALUE_ONLY),
    AxisType("Checkpoint name", TEXT, setting="sd_model_checkpoint", cost=1.0, choices=CHECKPOINT, legend=BASENAME),
    AxisType("Negative Guidance minimum sigma", FLOAT, field="s_min_uncond"),
    AxisType("Sigma Churn", FLOAT, field="s_churn"),
    AxisType("Sigma min", FLOAT, field="s_tmin"),
    AxisType("Sigma max", FLOAT, field="s_tmax"),
    AxisType("Sigma noise", FLOAT, field="s_noise"),
    AxisType("Schedule type", TEXT, field="scheduler", choices=SCHEDULE),
    _no("Schedule min sigma", FLOAT, _SCHED_OPT),
    _no("Schedule max sigma", FLOAT, _SCHED_OPT),
    _no("Schedule rho", FLOAT, _SCHED_OPT),
    _no("Beta schedule alpha", FLOAT, "the beta schedule's alpha and beta settings are not implemented"),
    _no("Beta schedule beta", FLOAT, "the beta schedule's alpha and beta settings are not implemented"),
    AxisType("Eta", FLOAT, field="eta"),
    AxisType("Clip skip", INT, setting="CLIP_stop_at_last_layers"),
    AxisType("Denoising", FLOAT, field="denoising_strength"),
    AxisType("Initial noise multiplier", FLOAT, field="initial_noise_multiplier"),
    _no("Extra noise", FLOAT, "img2img extra noise is not implemented"),
    AxisType("Hires upscaler", TEXT, field="hr_upscaler", tab="txt2img", choices=HIRES_UPSCALER),
    _no("Cond. Image Mask Weight", FLOAT, "the conditioning mask weight of inpainting models is not implemented",
        tab="img2img"),
    AxisType("VAE", TEXT, setting="sd_vae", cost=0.7, choices=VAE),
    AxisType("Styles", TEXT, field="styles", choices=STYLES),
    _no("UniPC Order", INT, "the UniPC order setting is not implemented"),
    AxisType("Face restore", TEXT, field="restore_faces", choices=None, legend=VALUE_ONLY),
    AxisType("Token merging ratio", FLOAT, setting="token_merging_ratio"),
    AxisType("Token merging ratio high-res", FLOAT, setting="token_merging_ratio_hr"),
    _no("Always discard next-to-last sigma", TEXT, "the always-discard-next-to-last-sigma setting is not implemented",
        choices=BOOLEAN),
    _no("SGM noise multiplier", TEXT, "the SGM noise multiplier setting is not implemented", choices=BOOLEAN),
    AxisType("Refiner checkpoint", TEXT, field="refiner_checkpoint", cost=1.0, choices=REFINER, legend=BASENAME),
    AxisType("Refiner switch at", FLOAT, field="refiner_switch_at"),
    AxisType("RNG source", TEXT, setting="randn_source", choices=RNG_SOURCE),
    _no("FP8 mode", TEXT, "FP8 weight storage is not implemented"),
    AxisType("Size", TEXT, field="size"),
)

# Forge's, for FLUX dev: Forge lists it after CFG Scale; here it follows A1111's list and the extensions' axes, so
# the indices A1111's clients send (ControlNet's axes included) keep their meaning.
FORGE_AXES: tuple[AxisType, ...] = (
    AxisType("Distilled CFG Scale", FLOAT, field="distilled_cfg_scale"),
)


def xyz_axes(is_img2img: bool, extra: Sequence[AxisType] = ()) -> list[AxisType]:
    """The axis list of a tab, in A1111's order: the `*_type` indices of `script_args` point into it. `extra`: the
    enabled extensions' axes, after A1111's (so those keep their indices); then Forge's."""
    tab = "img2img" if is_img2img else "txt2img"
    return [a for a in (*AXES, *extra, *FORGE_AXES) if a.tab is None or a.tab == tab]


# Positional script_args, in the order of A1111 1.10's ui() components.
XYZ_ARG_NAMES = ("x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown",
                 "z_type", "z_values", "z_values_dropdown", "draw_legend", "include_lone_images",
                 "include_sub_grids", "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z",
                 "margin_size", "csv_mode")
XYZ_ARG_DEFAULTS: dict[str, Any] = {
    "x_type": 1, "x_values": "", "x_values_dropdown": [], "y_type": 0, "y_values": "", "y_values_dropdown": [],
    "z_type": 0, "z_values": "", "z_values_dropdown": [], "draw_legend": True, "include_lone_images": False,
    "include_sub_grids": False, "no_fixed_seeds": False, "vary_seeds_x": False, "vary_seeds_y": False,
    "vary_seeds_z": False, "margin_size": 0, "csv_mode": False,
}
MARGIN_MAX = 500


def xyz_arg_specs(is_img2img: bool, extra: Sequence[AxisType] = ()) -> list:
    """The 18 controls as `ScriptArg`s of the scripts catalog, in `script_args` order, with A1111's labels and
    defaults (axis types: dropdowns whose index A1111's clients send; values: text, or a multiselect list)."""
    from backend.core.scripts_catalog import ScriptArg  # the catalog imports this module only inside a function

    labels = tuple(a.label for a in xyz_axes(is_img2img, extra))
    specs = []
    for axis, default in (("x", labels[1]), ("y", labels[0]), ("z", labels[0])):
        upper = axis.upper()
        specs += [ScriptArg(f"{axis}_type", f"{upper} type", "dropdown", default, choices=labels, index=True),
                  ScriptArg(f"{axis}_values", f"{upper} values", "textbox", ""),
                  ScriptArg(f"{axis}_values_dropdown", f"{upper} values", "list", [])]
    specs += [ScriptArg("draw_legend", "Draw legend", "checkbox", True),
              ScriptArg("include_lone_images", "Include Sub Images", "checkbox", False),
              ScriptArg("include_sub_grids", "Include Sub Grids", "checkbox", False),
              ScriptArg("no_fixed_seeds", "Keep -1 for seeds", "checkbox", False),
              ScriptArg("vary_seeds_x", "Vary seeds for X", "checkbox", False),
              ScriptArg("vary_seeds_y", "Vary seeds for Y", "checkbox", False),
              ScriptArg("vary_seeds_z", "Vary seeds for Z", "checkbox", False),
              ScriptArg("margin_size", "Grid margins (px)", "slider", 0, minimum=0, maximum=MARGIN_MAX, step=2),
              ScriptArg("csv_mode", "Use text inputs instead of dropdowns", "checkbox", False)]
    assert tuple(s.key for s in specs) == XYZ_ARG_NAMES
    return specs


@dataclass(frozen=True)
class XYZCatalogs:
    """What dropdown-valued axes are checked against (the app fills it from its catalogs).

    `checkpoints`: checkpoint titles as /sdapi/v1/sd-models lists them ("name.safetensors [hash]" or a name);
    `vaes`: VAE file names; `upscalers`: image upscaler names for hires. fix (the latent modes are always known);
    `styles`: the prompt styles' names (styles.csv).
    """
    checkpoints: tuple[str, ...] = ()
    vaes: tuple[str, ...] = ()
    upscalers: tuple[str, ...] = ()
    styles: tuple[str, ...] = ()

    def choices_for(self, kind: str | None) -> list[str] | None:
        """The values a dropdown axis offers (A1111's `choices()`), None for a text axis."""
        if kind == SAMPLER:
            return [s.name for s in SAMPLERS]
        if kind == SCHEDULE:
            return [s.label for s in SCHEDULERS]
        if kind == CHECKPOINT:
            return sorted(self.checkpoints, key=str.casefold)
        if kind == REFINER:
            return ["None", *sorted(self.checkpoints, key=str.casefold)]
        if kind == VAE:
            return ["Automatic", "None", *self.vaes]
        if kind == HIRES_UPSCALER:
            return [*LATENT_UPSCALE_MODES, *self.upscalers]
        if kind == BOOLEAN:
            return ["False", "True"]
        if kind == RNG_SOURCE:
            return list(RANDN_SOURCES)
        if kind == STYLES:
            return list(self.styles)
        return None

    def axis_choices(self, at: AxisType) -> list[str] | None:
        """The values the axis's dropdown offers (an extension axis's own `options()`), None for a text axis."""
        if at.options is not None:
            return list(at.options())
        return self.choices_for(at.choices)


@dataclass(frozen=True)
class Axis:
    """One axis of a plan: its type, the values it takes (already resolved), their legend texts, and the values
    text as the user gave it (written into the grid's infotext as A1111 does)."""
    name: str  # "X", "Y" or "Z"
    type: AxisType
    values: tuple
    labels: tuple[str, ...]
    text: str

    @property
    def is_nothing(self) -> bool:
        return self.type.kind == NOTHING


@dataclass(frozen=True)
class XYZPlan:
    x: Axis
    y: Axis
    z: Axis
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = 0
    csv_mode: bool = False
    is_img2img: bool = False

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return self.x, self.y, self.z

    @property
    def cell_count(self) -> int:
        return len(self.x.values) * len(self.y.values) * len(self.z.values)

    def portable(self) -> "XYZPlan":
        """The plan as the engine receives it: its axis types without their app-side functions."""
        return replace(self, **{a.name.lower(): replace(a, type=a.type.portable()) for a in self.axes})

    def always_on_key(self, cell: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """Which always-on scripts' variant a cell runs with: its indices along the extension axes (-1 on the
        others); None when no axis changes an always-on script."""
        if not any(a.type.script for a in self.axes):
            return None
        return tuple(i if a.type.script else -1 for a, i in zip(self.axes, cell))

    def loop_order(self) -> tuple[str, str]:
        """(outermost, second) axis names, as A1111 orders its loops: the costliest axis outermost; with equal
        costs Z, then Y (so X changes fastest)."""
        cx, cy, cz = (a.type.cost for a in self.axes)
        if cx > cy and cx > cz:
            return "x", ("y" if cy > cz else "z")
        if cy > cx and cy > cz:
            return "y", ("x" if cx > cz else "z")
        if cz > cx and cz > cy:
            return "z", ("x" if cx > cy else "y")
        return "z", "y"

    def cells(self) -> list[tuple[int, int, int]]:
        """(ix, iy, iz) of every cell in the order they are generated."""
        sizes = {"x": len(self.x.values), "y": len(self.y.values), "z": len(self.z.values)}
        first, second = self.loop_order()
        third = ({"x", "y", "z"} - {first, second}).pop()
        out = []
        for a in range(sizes[first]):
            for b in range(sizes[second]):
                for c in range(sizes[third]):
                    idx = {first: a, second: b, third: c}
                    out.append((idx["x"], idx["y"], idx["z"]))
        return out


# --- value syntax --------------------------------------------------------------------------------------------------

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
RE_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
RE_RANGE_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
RE_RANGE_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*\])?\s*")
RE_RANGE_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+(?:\.\d*)?)\s*\])?\s*")


def split_values(text: str) -> list[str]:
    """A1111's csv_string_to_list_strip: CSV fields (quotes allowed), stripped."""
    return [v.strip() for v in chain.from_iterable(csv.reader(io.StringIO(text), skipinitialspace=True))]


def list_to_csv(values: Iterable[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(list(values))
    return out.getvalue().strip()


def _num(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _too_many(axis: str, label: str, value: str, count: int) -> UserError:
    return UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r} makes {count} values; at most "
                     f"{MAX_VALUES_PER_AXIS} are allowed per axis.")


def _expand_int(axis: str, label: str, value: str) -> list[Any]:
    m = RE_RANGE.fullmatch(value)
    if m:
        start, end, step = int(_num(m.group(1))), int(_num(m.group(2))) + 1, int(m.group(3) or 1)
        if step == 0:
            raise UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r}: the increment must not be 0.")
        values = range(start, end, step)
        if len(values) > MAX_VALUES_PER_AXIS:
            raise _too_many(axis, label, value, len(values))
        if not values:
            raise UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r} gives no values (a range that "
                            f"counts down needs a negative increment, as in '10-1 (-3)').")
        return list(values)
    mc = RE_RANGE_COUNT.fullmatch(value)
    if mc:
        start, end, num = int(_num(mc.group(1))), int(_num(mc.group(2))), int(mc.group(3) or 1)
        if num > MAX_VALUES_PER_AXIS:
            raise _too_many(axis, label, value, num)
        return [int(v) for v in np.linspace(start, end, num).tolist()]
    return [value]


def _expand_float(axis: str, label: str, value: str) -> list[Any]:
    m = RE_RANGE_FLOAT.fullmatch(value)
    if m:
        start, end, step = float(_num(m.group(1))), float(_num(m.group(2))), float(m.group(3) or 1)
        if step == 0:
            raise UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r}: the increment must not be 0.")
        count = math.ceil((end + step - start) / step)
        if count > MAX_VALUES_PER_AXIS:
            raise _too_many(axis, label, value, count)
        values = np.arange(start, end + step, step).tolist()
        if not values:
            raise UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r} gives no values (a range that "
                            f"counts down needs a negative increment, as in '1-0 (-0.25)').")
        return values
    mc = RE_RANGE_COUNT_FLOAT.fullmatch(value)
    if mc:
        start, end = float(_num(mc.group(1))), float(_num(mc.group(2)))
        num = int(float(mc.group(3) or 1))
        if num > MAX_VALUES_PER_AXIS:
            raise _too_many(axis, label, value, num)
        return np.linspace(start, end, num).tolist()
    return [value]


def _bad(axis: str, label: str, value: Any, why: str) -> UserError:
    return UserError(f"X/Y/Z plot: {axis} axis ({label}) value {value!r} {why}")


def _match_checkpoint(name: str, titles: Sequence[str]) -> str | None:
    """A1111's get_closet_checkpoint_match: the title, the name without its hash or extension, else the shortest
    title that contains the text."""
    def stem(title: str) -> str:
        return re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", title)

    for title in titles:
        plain = stem(title)
        if name in (title, plain, os.path.splitext(plain)[0], os.path.basename(plain),
                    os.path.splitext(os.path.basename(plain))[0]):
            return title
    found = sorted((t for t in titles if name in t), key=len)
    return found[0] if found else None


def _resolve_choice(axis: str, at: AxisType, value: str, catalogs: XYZCatalogs) -> Any:
    kind, label = at.choices, at.label
    if kind == SAMPLER:
        try:
            base, schedule = split_sampler_and_schedule(value)  # "DPM++ 2M Karras": the sampler with its schedule
            name = find_sampler(base).name
        except UserError:
            raise _bad(axis, label, value, f"is not a sampler. Valid samplers: "
                                            f"{', '.join(s.name for s in SAMPLERS)}.") from None
        return f"{name} {schedule}" if schedule else name
    if kind == SCHEDULE:
        try:
            return find_scheduler(value).label
        except UserError:
            raise _bad(axis, label, value, f"is not a schedule type. Valid: "
                                            f"{', '.join(s.label for s in SCHEDULERS)}.") from None
    if kind == REFINER and value.strip().lower() in ("", "none"):
        return "None"
    if kind in (CHECKPOINT, REFINER):
        found = _match_checkpoint(value, catalogs.checkpoints)
        if found is None:
            raise _bad(axis, label, value, "is not a checkpoint in the checkpoint list (see /sdapi/v1/sd-models).")
        return found
    if kind == VAE:
        lowered = value.strip().lower()
        if lowered in ("auto", "automatic"):
            return "Automatic"
        if lowered == "none":
            return "None"
        for vae in catalogs.vaes:
            if vae.lower() == lowered:
                return vae
        raise _bad(axis, label, value, f"is not a VAE. Valid: Automatic, None"
                                        f"{''.join(', ' + v for v in catalogs.vaes)}.")
    if kind == STYLES:  # one value: a style name, or several joined by commas (A1111 splits it), all known
        unknown = [name for name in _style_names(value) if name not in catalogs.styles]
        if unknown:
            raise _bad(axis, label, value, f"names no prompt style ({', '.join(unknown)}). Styles: "
                                            f"{', '.join(catalogs.styles) or 'none (styles.csv is empty)'}.")
        return value
    if kind == RNG_SOURCE:
        for option in RANDN_SOURCES:
            if option.lower() == value.strip().lower():
                return option
        raise _bad(axis, label, value, f"is not a random number source. Valid: {', '.join(RANDN_SOURCES)}.")
    if kind == HIRES_UPSCALER:
        for option in (*LATENT_UPSCALE_MODES, *catalogs.upscalers):
            if option.lower() == value.strip().lower():
                return option
        raise _bad(axis, label, value, f"is not a hires. fix upscaler. Valid: "
                                        f"{', '.join([*LATENT_UPSCALE_MODES, *catalogs.upscalers])}.")
    return value


def _style_names(value: str) -> list[str]:
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _face_restore(axis: str, value: str) -> tuple[bool, str | None]:
    lowered = value.strip().lower()
    if lowered == "codeformer":
        return True, "CodeFormer"
    if lowered == "gfpgan":
        return True, "GFPGAN"
    return lowered in ("true", "yes", "y", "1"), None


def _size(axis: str, label: str, value: str) -> tuple[int, int]:
    width, sep, height = value.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(width.strip()), int(height.strip())
    except ValueError:
        raise _bad(axis, label, value, "is not a size; write it as WIDTHxHEIGHT, e.g. 512x768.") from None


def _legend(at: AxisType, value: Any) -> str:
    if at.legend == BLANK:
        return ""
    if isinstance(value, float):
        value = round(value, 8)
    if at.legend == JOINED:
        return ", ".join(value)
    if at.label == "Size":
        value = f"{value[0]}x{value[1]}"
    elif at.label == "Face restore":
        value = value[2]
    if at.legend == BASENAME:
        return os.path.basename(re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(value)))
    if at.legend == VALUE_ONLY:
        return str(value)
    return f"{at.label}: {value}"


def _parse_axis(name: str, at: AxisType, text: Any, dropdown: Any, csv_mode: bool, request,
                catalogs: XYZCatalogs) -> Axis:
    label = at.label
    if at.kind == NOTHING:
        return Axis(name, at, (0,), ("",), "")
    if at.unsupported:
        raise UserError(f"X/Y/Z plot: the {name} axis type {label!r} is not supported in Easel: {at.unsupported}.",
                        status=422)
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise UserError(f"X/Y/Z plot: {name} values must be text, got {text!r}.", status=422)
    if dropdown is None:
        dropdown = []
    if isinstance(dropdown, str):
        dropdown = split_values(dropdown)
    if not isinstance(dropdown, list) or not all(isinstance(v, str) for v in dropdown):
        raise UserError(f"X/Y/Z plot: {name} values (dropdown) must be a list of names, got {dropdown!r}.", status=422)
    choices = catalogs.axis_choices(at)
    has_choices = choices is not None
    if has_choices and not csv_mode and dropdown:
        raw = [v.strip() for v in dropdown]
        text = list_to_csv(raw)
    else:
        raw = split_values(text)

    if at.kind == INT:
        raw = list(chain.from_iterable(_expand_int(name, label, v) for v in raw if v.strip() != ""))
    elif at.kind == FLOAT:
        raw = list(chain.from_iterable(_expand_float(name, label, v) for v in raw if v.strip() != ""))
    elif at.kind == PERMUTATIONS:
        if math.factorial(len(raw)) > MAX_VALUES_PER_AXIS:
            raise _too_many(name, label, text, math.factorial(len(raw)))
        raw = list(permutations(raw))
    if not raw:
        raise UserError(f"X/Y/Z plot: the {name} axis ({label}) has no values.")

    values: list[Any] = []
    for v in raw:
        if at.kind == INT:
            try:
                values.append(int(_num(v)) if isinstance(v, str) else int(v))
            except ValueError:
                raise _bad(name, label, v, "is not a whole number or a range such as 1-5, 1-5 (+2) or 1-10 [5].") from None
        elif at.kind == FLOAT:
            try:
                number = float(v)
            except ValueError:
                raise _bad(name, label, v, "is not a number or a range such as 0-1 (+0.25) or 1-10 [5].") from None
            if not math.isfinite(number):
                raise _bad(name, label, v, "is not a finite number.")
            values.append(number)
        elif at.kind == PERMUTATIONS:
            values.append(tuple(v))
        elif at.label == "Prompt S/R":
            values.append(v)
        elif at.label == "Size":
            values.append(_size(name, label, v))
        elif at.label == "Face restore":
            on, model = _face_restore(name, v)
            values.append((on, model, v))
        elif at.options is not None:  # an extension's dropdown: its choice's spelling; the extension checks others
            values.append(next((c for c in choices if c.lower() == v.strip().lower()), v.strip()))
        else:
            values.append(_resolve_choice(name, at, v, catalogs))

    if at.label == "Prompt S/R" and values[0] not in request.prompt and values[0] not in request.negative_prompt:
        raise _bad(name, label, values[0], "(Prompt S/R searches for the first value) is not in the prompt or the "
                                           "negative prompt.")
    if at.label == "Prompt order":
        for token in raw[0] if raw else ():
            if token not in request.prompt:
                raise _bad(name, label, token, "(Prompt order) is not in the prompt.")
    return Axis(name, at, tuple(values), tuple(_legend(at, v) for v in values), text)


def _flag(args: dict, key: str) -> bool:
    value = args[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"X/Y/Z plot: {key} must be true or false, got {value!r}.", status=422)


def _axis_type(args: dict, key: str, axes: list[AxisType], is_img2img: bool) -> AxisType:
    value = args[key]
    if value is None:
        value = 0
    if isinstance(value, str):
        matches = [a for a in axes if a.label.lower() == value.strip().lower()]
        if matches:
            return matches[0]
        if not value.strip().lstrip("-").isdigit():
            raise UserError(f"X/Y/Z plot: unknown {key} {value!r}. Valid: {', '.join(a.label for a in axes)}.",
                            status=422)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise UserError(f"X/Y/Z plot: {key} must be an axis index, got {value!r}.", status=422)
    index = int(value)
    if not 0 <= index < len(axes):
        tab = "img2img" if is_img2img else "txt2img"
        raise UserError(f"X/Y/Z plot: {key} {index} is not an axis index; {tab} has axes 0-{len(axes) - 1} "
                        f"({', '.join(f'{i}: {a.label}' for i, a in enumerate(axes))}).", status=422)
    return axes[index]


def parse_xyz_args(script_args: Sequence[Any], request, catalogs: XYZCatalogs | None = None, *,
                   is_img2img: bool = False, max_images: int | None = None,
                   max_grid_megapixels: float = DEFAULT_MAX_GRID_MEGAPIXELS,
                   extra_axes: Sequence[AxisType] = ()) -> XYZPlan:
    """A1111's positional X/Y/Z `script_args` -> an `XYZPlan`, every value checked; or a `UserError` naming the
    axis and the value. Missing trailing arguments take their defaults (as A1111's API fills them).

    `request`: the base Txt2ImgRequest / Img2ImgRequest (Prompt S/R and the request checks look at it);
    `max_images`: the `max_images_per_job` limit, checked against cells x batch size x batch count;
    `extra_axes`: the enabled extensions' axes (after A1111's in the list).
    """
    catalogs = catalogs or XYZCatalogs()
    if script_args is None:
        script_args = []
    if not isinstance(script_args, (list, tuple)):
        raise UserError("X/Y/Z plot: script_args must be a list.", status=422)
    if len(script_args) > len(XYZ_ARG_NAMES):
        raise UserError(f"X/Y/Z plot takes at most {len(XYZ_ARG_NAMES)} script_args "
                        f"({', '.join(XYZ_ARG_NAMES)}), got {len(script_args)}.", status=422)
    args = dict(XYZ_ARG_DEFAULTS)
    args.update(zip(XYZ_ARG_NAMES, script_args))
    axes = xyz_axes(is_img2img, extra_axes)
    csv_mode = _flag(args, "csv_mode")
    margin = args["margin_size"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
            or not 0 <= margin <= MARGIN_MAX:
        raise UserError(f"X/Y/Z plot: margin_size must be a number of pixels from 0 to {MARGIN_MAX}, got {margin!r}.",
                        status=422)

    parsed = []
    for name in ("x", "y", "z"):
        at = _axis_type(args, f"{name}_type", axes, is_img2img)
        parsed.append(_parse_axis(name.upper(), at, args[f"{name}_values"], args[f"{name}_values_dropdown"],
                                  csv_mode, request, catalogs))
    plan = XYZPlan(*parsed, draw_legend=_flag(args, "draw_legend"),
                   include_lone_images=_flag(args, "include_lone_images"),
                   include_sub_grids=_flag(args, "include_sub_grids"), no_fixed_seeds=_flag(args, "no_fixed_seeds"),
                   vary_seeds_x=_flag(args, "vary_seeds_x"), vary_seeds_y=_flag(args, "vary_seeds_y"),
                   vary_seeds_z=_flag(args, "vary_seeds_z"), margin_size=int(margin), csv_mode=csv_mode,
                   is_img2img=is_img2img)

    per_cell = max(1, int(request.batch_size)) * max(1, int(request.n_iter))
    if max_images is not None and plan.cell_count * per_cell > max_images:
        raise UserError(f"X/Y/Z plot would make {plan.cell_count * per_cell} images ({plan.cell_count} cells x "
                        f"{per_cell} per cell), more than the limit of {max_images} images per job. Use fewer values, "
                        f"or raise the limit in Settings > Limits (max_images_per_job).", status=413)
    _check_grid_size(plan, request, max_grid_megapixels)
    _check_values(plan, request, is_img2img)
    return plan


def _check_grid_size(plan: XYZPlan, request, max_mp: float) -> None:
    width = max([v[0] for v in plan.x.values] if plan.x.type.label == "Size" else [request.width])
    height = max([v[1] for v in plan.x.values] if plan.x.type.label == "Size" else [request.height])
    for axis in (plan.y, plan.z):
        if axis.type.label == "Size":
            width, height = max(width, max(v[0] for v in axis.values)), max(height, max(v[1] for v in axis.values))
    megapixels = plan.cell_count * width * height / 1_000_000
    if megapixels >= max_mp:
        raise UserError(f"X/Y/Z plot: the grid would be too large ({round(megapixels)} megapixels); at most "
                        f"{max_mp:g} megapixels are allowed.", status=413)


def _check_values(plan: XYZPlan, request, is_img2img: bool) -> None:
    """Every value of every axis through the request checks (and the settings gate for settings), alone on the
    base request: a value the generation would refuse is refused now, before the first image."""
    check = check_img2img if is_img2img else check_txt2img
    for axis in plan.axes:
        if axis.is_nothing:
            continue
        for value in dict.fromkeys(axis.values):
            if axis.type.setting and axis.type.choices is None:
                try:
                    coerce(SETTINGS_BY_KEY[axis.type.setting], value)
                except UserError as exc:
                    raise _bad(axis.name, axis.type.label, value, f"is refused: {exc.message}") from None
            try:
                check(cell_request(request, [(axis.type, value, axis.values)]))
            except UserError as exc:
                raise _bad(axis.name, axis.type.label, value, f"is refused: {exc.message}") from None


# --- applying values -----------------------------------------------------------------------------------------------

def _reorder(prompt: str, tokens: Sequence[str]) -> str:
    """A1111's apply_order: the tokens, wherever they are in the prompt, put back in the given order."""
    order = sorted(((prompt.find(t), t) for t in tokens), key=lambda item: item[0])
    parts, rest = [], prompt
    for _, token in order:
        n = rest.find(token)
        parts.append(rest[:n])
        rest = rest[n + len(token):]
    return "".join(part + tokens[i] for i, part in enumerate(parts)) + rest


def cell_request(request, cell: Iterable[tuple[AxisType, Any, Sequence[Any]]]):
    """`request` (a pydantic request) with each (axis type, value, all the axis's values) applied, as A1111's
    `AxisOption.apply`: request fields are set, settings go into `override_settings`, Prompt S/R replaces the first
    value in the prompts, Prompt order reorders the prompt, an extension's axis changes its always-on script's entry
    (in the app process; the engine gets the cell's parsed scripts instead). The cell is an ordinary generation: its
    `script_name` and `script_args` are cleared. The base request is not changed."""
    update: dict[str, Any] = {}
    alwayson = request.alwayson_scripts
    overrides = dict(request.override_settings)
    prompt, negative = request.prompt, request.negative_prompt
    for at, value, values in cell:
        if at.kind == NOTHING:
            continue
        if at.label == "Prompt S/R":
            prompt, negative = prompt.replace(values[0], value), negative.replace(values[0], value)
        elif at.label == "Prompt order":
            prompt = _reorder(prompt, list(value))
        elif at.label == "Size":
            update["width"], update["height"] = value
        elif at.label == "Styles":  # added to the request's own styles, as A1111's p.styles.extend
            update["styles"] = [*update.get("styles", request.styles), *_style_names(value)]
        elif at.label == "Face restore":
            on, model, _text = value
            update["restore_faces"] = on
            if model:
                overrides["face_restoration_model"] = model
        elif at.script:
            if at.apply is not None:
                alwayson = at.apply(alwayson, value)
        elif at.setting:
            overrides[at.setting] = value
        else:
            update[at.field] = value
    if alwayson is not request.alwayson_scripts:
        update["alwayson_scripts"] = alwayson
    update.update(prompt=prompt, negative_prompt=negative, override_settings=overrides, script_name=None,
                  script_args=[])
    return request.model_copy(update=update)
