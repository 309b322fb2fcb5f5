"""The Refiner accordion of txt2img and img2img (AUTOMATIC1111 1.6+) and the hires. fix checkpoint dropdown.

Refiner: an "Enable" checkbox, the checkpoint that takes over (with its refresh button) and "Switch at", the
fraction of the steps after which it does (0.01-1, default 0.8); they become the request's `refiner_checkpoint` and
`refiner_switch_at` (`request_fields`). The element ids are A1111's (script_<tab>_refiner_*), which its users' CSS
and scripts know.
"""
from __future__ import annotations

import gradio as gr

from backend.core.errors import UserError
from backend.core.second_checkpoints import SAME_CHECKPOINT  # the hires. checkpoint list's first entry
from backend.service import EaselService


def build(service: EaselService, tab: str, c: dict) -> None:
    """The accordion's controls into `c` under refiner_enabled, refiner_checkpoint, refiner_switch_at."""
    prefix = f"script_{tab}_refiner"
    with gr.Accordion("Refiner", open=False, elem_id=prefix):
        c["refiner_enabled"] = gr.Checkbox(False, label="Enable refiner", elem_id=f"{prefix}_enable")
        with gr.Row(elem_classes=["easel-compact-sliders"]):
            c["refiner_checkpoint"] = gr.Dropdown(service.checkpoint_titles(), value=None, label="Checkpoint",
                                                  elem_id=f"{prefix}_checkpoint", allow_custom_value=True, scale=3)
            refresh = gr.Button("\U0001f504", elem_id=f"{prefix}_checkpoint_refresh", size="sm", min_width=40,
                                scale=0)
            c["refiner_switch_at"] = gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Switch at",
                                               elem_id=f"{prefix}_switch_at", scale=3)

    def on_refresh(current):
        service.refresh_checkpoints()
        return gr.update(choices=service.checkpoint_titles(), value=current)

    refresh.click(on_refresh, [c["refiner_checkpoint"]], [c["refiner_checkpoint"]], queue=False)


def hires_checkpoint(service: EaselService, tab: str) -> gr.Dropdown:
    """The hires. fix's "Hires checkpoint" dropdown (`hr_checkpoint_name`), "Use same checkpoint" first."""
    return gr.Dropdown([SAME_CHECKPOINT, *service.checkpoint_titles()], value=SAME_CHECKPOINT, label="Hires checkpoint",
                       elem_id=f"{tab}_hr_checkpoint", allow_custom_value=True)


def request_fields(fields: dict) -> dict:
    """The tab's values (field name -> value) with the accordion's turned into the request's: no refiner unless it is
    enabled and a checkpoint is chosen (A1111's rule); `refiner_enabled` taken out."""
    enabled = bool(fields.pop("refiner_enabled", False))
    if not enabled or not fields.get("refiner_checkpoint"):
        fields["refiner_checkpoint"], fields["refiner_switch_at"] = None, None
    else:
        fields["refiner_switch_at"] = float(fields["refiner_switch_at"])
    if "hr_checkpoint_name" in fields and fields["hr_checkpoint_name"] in ("", None):
        fields["hr_checkpoint_name"] = SAME_CHECKPOINT
    return fields


def pasted_values(service: EaselService, values: dict) -> dict:
    """An infotext's request fields for the accordion and the hires. checkpoint: the checkpoints named by their
    list titles (the infotext has "name [hash]"), the accordion enabled when the infotext names a refiner."""
    out = dict(values)
    out["refiner_enabled"] = "refiner_checkpoint" in values
    for key in ("refiner_checkpoint", "hr_checkpoint_name"):
        if key in values:
            try:
                out[key] = service.registry.find_checkpoint(str(values[key])).title
            except UserError:  # a checkpoint not on this machine: shown as written
                out[key] = str(values[key])
    out.setdefault("hr_checkpoint_name", SAME_CHECKPOINT)  # A1111's default of "Hires checkpoint"
    return out
