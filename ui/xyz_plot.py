"""The X/Y/Z plot's controls in the UI beyond the generic script controls (`ui/scripts.py` builds those from the
script's argument specs), as in A1111:

- an axis type with choices (Sampler, Checkpoint name, VAE, Schedule type, Hires upscaler, "[ControlNet] Model",
  ...) shows a multiselect dropdown of its choices instead of the values text box, filled when the type changes;
  "Use text inputs instead of dropdowns" (csv_mode) switches every axis back to its text box, carrying the
  chosen values over as text (and back);
- the "Fill X values" button (A1111's 📒) beside an axis with choices fills its values with every choice;
- the swap buttons exchange two axes' types and values (X/Y, Y/Z, X/Z).
"""
from __future__ import annotations

import gradio as gr

from backend.core.xyz_axes import XYZ_ARG_NAMES, list_to_csv, split_values, xyz_axes
from backend.service import EaselService



def wire(service: EaselService, tab: str, controls: list, elem_prefix: str) -> None:
    """Add the buttons and events to the X/Y/Z plot's `controls` (its components in `script_args` order)."""
    c = dict(zip(XYZ_ARG_NAMES, controls))
    axes = xyz_axes(tab == "img2img", service.xyz_extra_axes)

    def choices_of(index) -> list[str] | None:
        if not isinstance(index, int) or not 0 <= index < len(axes):
            index = 0
        return service.xyz_axis_choices(axes[index])

    def select_axis(index, text: str, chosen: list | None, csv_mode: bool):
        """A1111's select_axis: the dropdown (with the type's choices) or the text box, the values carried over."""
        choices = choices_of(index)
        chosen = list(chosen or [])
        if choices is None:  # the text box as the user left it: no value sent back, so what was typed after the
            # type changed (before this answer came) is not overwritten by the value this event read
            return gr.update(visible=False), gr.update(visible=True), gr.update(visible=False, choices=[], value=[])
        if csv_mode:
            if chosen:
                text = list_to_csv([v for v in chosen if v in choices])
            chosen = []
        elif text:
            chosen = [v for v in split_values(text) if v in choices]
            text = ""
        chosen = [v for v in chosen if v in choices]
        return gr.update(visible=True), gr.update(visible=csv_mode, value=text), \
            gr.update(visible=not csv_mode, choices=choices, value=chosen)

    def fill(index, csv_mode: bool):
        choices = choices_of(index) or []
        return (gr.update(value=list_to_csv(choices)), gr.update()) if csv_mode else \
            (gr.update(), gr.update(value=choices))

    with gr.Row():
        fills = {}
        for axis in ("x", "y", "z"):
            fills[axis] = gr.Button(f"Fill {axis.upper()} values", visible=False, size="sm",
                                    elem_id=f"{elem_prefix}_fill_{axis}")
        swaps = {pair: gr.Button(f"Swap {pair[0].upper()}/{pair[1].upper()} axes", size="sm",
                                 elem_id=f"{elem_prefix}_swap_{pair}")
                 for pair in ("xy", "yz", "xz")}

    for axis in ("x", "y", "z"):
        type_, text, chosen = c[f"{axis}_type"], c[f"{axis}_values"], c[f"{axis}_values_dropdown"]
        type_.change(select_axis, inputs=[type_, text, chosen, c["csv_mode"]], outputs=[fills[axis], text, chosen],
                     queue=False)
        fills[axis].click(fill, inputs=[type_, c["csv_mode"]], outputs=[text, chosen], queue=False)

    def switch_all(csv_mode: bool, *values):
        out = []
        for n in range(3):
            out.extend(select_axis(*values[3 * n:3 * n + 3], csv_mode))
        return out

    every = [c[f"{a}_{k}"] for a in ("x", "y", "z") for k in ("type", "values", "values_dropdown")]
    c["csv_mode"].change(switch_all, inputs=[c["csv_mode"], *every],
                         outputs=[comp for a in ("x", "y", "z")
                                  for comp in (fills[a], c[f"{a}_values"], c[f"{a}_values_dropdown"])], queue=False)

    def swap(type1, text1, chosen1, type2, text2, chosen2):
        """A1111's swap_axes: the two axes' types (shown as their labels) and values exchanged."""
        label = (lambda i: axes[i].label if isinstance(i, int) and 0 <= i < len(axes) else axes[0].label)
        return label(type2), text2, chosen2, label(type1), text1, chosen1

    for pair, button in swaps.items():
        a, b = pair
        args = [c[f"{a}_type"], c[f"{a}_values"], c[f"{a}_values_dropdown"],
                c[f"{b}_type"], c[f"{b}_values"], c[f"{b}_values_dropdown"]]
        button.click(swap, inputs=args, outputs=args, queue=False)
