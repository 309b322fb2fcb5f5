"""ControlNet's X/Y/Z plot axes, as sd-webui-controlnet adds them to AUTOMATIC1111's axis list (after the built-in
axes, in its order): "[ControlNet] Enabled", "Model", "Weight", "Guidance Start", "Guidance End", "Control Mode",
"Resize Mode", "Preprocessor", "Pre Resolution", "Pre Threshold A", "Pre Threshold B".

Each sets one field of the request's ControlNet units (`alwayson_scripts.controlnet.args`) as that extension
does with its `control_net_*` processing attributes: a value applies to every unit of the request, "Enabled" only
to the first unit. The cells' units are then checked and parsed like a job's (`ControlNetService.units_for_job`),
so a value ControlNet refuses (a weight above 2, an unknown model) is a 422 naming the axis and the value.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from backend.controlnet.units import CONTROL_MODES, RESIZE_MODES
from backend.core.xyz_axes import FLOAT, INT, TEXT, AxisType

SCRIPT = "controlnet"


def set_unit_field(alwayson_scripts: dict, value: Any, *, name: str, first_only: bool = False) -> dict:
    """`alwayson_scripts` with the ControlNet units' `name` set to `value` (every unit; `first_only`: the first),
    as new dicts. A request without units, or whose units are not objects, is left as it is (its check says why)."""
    out = dict(alwayson_scripts or {})
    key = next((k for k in out if str(k).strip().lower() == SCRIPT), None)
    if key is None:
        return out
    entry = out[key]
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    units = [args] if isinstance(args, dict) else args
    if not isinstance(units, list):
        return out
    changed = [dict(unit, **{name: value}) if isinstance(unit, dict) and (i == 0 or not first_only) else unit
               for i, unit in enumerate(units)]
    out[key] = dict(entry, args=changed) if isinstance(entry, dict) else changed
    return out


def controlnet_axes(controlnet) -> list[AxisType]:
    """The axes, for the ControlNet component `controlnet` (`ControlNetService`: its model and preprocessor lists
    fill the Model and Preprocessor dropdowns)."""

    def axis(label: str, kind: str, name: str, options=None, cost: float = 0.0, first_only: bool = False):
        return AxisType(f"[ControlNet] {label}", kind, cost=cost, script=SCRIPT, options=options,
                        apply=partial(set_unit_field, name=name, first_only=first_only))

    return [
        axis("Enabled", TEXT, "enabled", lambda: ["False", "True"], first_only=True),
        axis("Model", TEXT, "model", lambda: ["None", *controlnet.registry.titles()], cost=0.9),
        axis("Weight", FLOAT, "weight"),
        axis("Guidance Start", FLOAT, "guidance_start"),
        axis("Guidance End", FLOAT, "guidance_end"),
        axis("Control Mode", TEXT, "control_mode", lambda: list(CONTROL_MODES)),
        axis("Resize Mode", TEXT, "resize_mode", lambda: list(RESIZE_MODES)),
        axis("Preprocessor", TEXT, "module", controlnet.module_names),
        axis("Pre Resolution", INT, "processor_res"),
        axis("Pre Threshold A", FLOAT, "threshold_a"),
        axis("Pre Threshold B", FLOAT, "threshold_b"),
    ]
