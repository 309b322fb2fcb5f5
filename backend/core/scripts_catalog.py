"""The selectable scripts (A1111's "Script" dropdown and the API's `script_name` + `script_args`), torch-free.

Each script is a `ScriptSpec`: its A1111 title, the tabs it shows in, and its positional arguments as typed
`ScriptArg`s in the order of A1111's `script_args`. From these one table:

- the API checks `script_args` at the edge (`ScriptSpec.check_args`: missing trailing values take their
  defaults, as A1111 fills them; a bad value is a 422 naming the argument), before any job is queued;
- `GET /sdapi/v1/scripts` and `GET /sdapi/v1/script-info` answer in A1111's shapes (`scripts_list`, `script_info`);
- the UI builds each script's controls (`ui/scripts.py`).

A script runs in one of two ways. `engine=True`: the backend's script registry (`backend/engine/scripts/`, same
lower-case name) runs it around the ordinary pipeline (several generations in one job). `engine=False`: the
img2img pipeline itself reads the script from the request (Poor man's outpainting, SD upscale; their arguments
through `backend.core.request_checks`).

To plug a script in: one `ScriptSpec` in `SCRIPTS` here (with `prepare` when its arguments need more than the
per-argument checks) and, for an engine script, one entry in `ENGINE_SCRIPTS` of `backend/engine/scripts/__init__.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from backend.core.errors import UserError

TABS = ("txt2img", "img2img")
SCRIPT_NOT_FOUND_STATUS = 422  # A1111: HTTPException(422, "Script '...' not found")


@dataclass(frozen=True)
class ScriptArg:
    """One positional script argument, as A1111's control for it.

    kind: "checkbox" (bool), "slider"/"number" (a number in [minimum, maximum]; whole when `step` is whole),
    "radio"/"dropdown" (one of `choices`; `index=True`: A1111 passes the choice's index), "checkboxgroup" (a list
    of `choices`; a single string is taken as a list of one), "list" (a list of values the script's `prepare`
    checks, e.g. X/Y/Z plot's dropdown values: A1111's multiselect dropdown), "textbox" (text), "upscaler" (an
    upscaler's index or name, checked where the upscaler list is known), "info" (A1111's HTML/markdown
    placeholder: any value). `accept`: the range the API takes when wider than the slider's.
    """

    key: str
    label: str
    kind: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | None = None
    index: bool = False
    lines: int = 1
    # The range the API accepts when wider than the control's (A1111 does not hold API values to its sliders;
    # Easel holds them to what is safe): (low, high).
    accept: tuple[float, float] | None = None
    upload: bool = False  # textbox: the UI offers a text file to fill it (A1111's "Upload prompt inputs")

    @property
    def whole(self) -> bool:
        return self.step is not None and float(self.step).is_integer()

    def check(self, value: Any, where: str) -> Any:
        """The checked, coerced value; `where` names the argument in error messages."""
        kind = self.kind
        if kind == "info":
            return value
        if kind == "checkbox":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            raise UserError(f"{where} must be true or false, got {value!r}.", status=422)
        if kind in ("slider", "number"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise UserError(f"{where} must be a number, got {value!r}.", status=422)
            try:
                number = float(value)
            except ValueError:
                raise UserError(f"{where} must be a number, got {value!r}.", status=422) from None
            if not math.isfinite(number):
                raise UserError(f"{where} must be a finite number, got {value!r}.", status=422)
            low, high = self.accept or (self.minimum, self.maximum)
            if low is not None and number < low or high is not None and number > high:
                bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None  # an extension's
                          else f"at least {low:g}" if low is not None else f"at most {high:g}")  # gr.Number: one
                raise UserError(f"{where} must be {bounds}, got {number:g}.", status=422)
            return int(round(number)) if self.whole else number
        if kind in ("radio", "dropdown"):
            choices = list(self.choices or ())
            if self.index:
                if isinstance(value, str) and value.strip().lower() in [c.lower() for c in choices]:
                    return [c.lower() for c in choices].index(value.strip().lower())
                if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() \
                        and 0 <= int(value) < len(choices):
                    return int(value)
                raise UserError(f"{where} must be one of {_listing(choices)} (or its index 0-{len(choices) - 1}), "
                                f"got {value!r}.", status=422)
            if isinstance(value, str):
                for choice in choices:
                    if value.strip().lower() == str(choice).lower():
                        return choice
            raise UserError(f"{where} must be one of {_listing(choices)}, got {value!r}.", status=422)
        if kind == "checkboxgroup":
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)):
                raise UserError(f"{where} must be a list of {_listing(self.choices or ())}, got {value!r}.", status=422)
            picked = []
            for item in values:
                match = next((c for c in self.choices or () if isinstance(item, str)
                              and item.strip().lower() == str(c).lower()), None)
                if match is None:
                    raise UserError(f"{where}: {item!r} is not one of {_listing(self.choices or ())}.", status=422)
                picked.append(match)
            return picked
        if kind == "list":
            values = [] if value is None else ([value] if isinstance(value, str) else value)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, (str, int, float)) and
                                                                not isinstance(v, bool) for v in values):
                raise UserError(f"{where} must be a list of values, got {value!r}.", status=422)
            return [str(v) for v in values]
        if kind == "textbox":
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise UserError(f"{where} must be text, got {type(value).__name__}.", status=422)
            return str(value)
        if kind == "upscaler":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise UserError(f"{where} must be an index into /sdapi/v1/upscalers or a name, got {value!r}.",
                                status=422)
            return value
        raise AssertionError(f"unknown script argument kind {kind!r}")

    def info(self, choices: tuple | None = None) -> dict:
        """A1111's /sdapi/v1/script-info entry for the argument."""
        return {"label": self.label, "value": self.default, "minimum": self.minimum, "maximum": self.maximum,
                "step": self.step, "choices": list(choices if choices is not None else self.choices or []) or None}


@dataclass(frozen=True)
class PreparedScript:
    """What the edge sends on: the engine script's arguments; the derived requests the service checks like the
    job's own before anything is queued, each with the words that name it in an error (Prompts from file: one
    per line); how many pictures the job makes (held to the server's images-per-job limit), None: the request's."""

    args: Any
    requests: list[tuple[str, Any]] = field(default_factory=list)
    images: int | None = None
    # The model settings some of the script's generations run with besides the job's (X/Y/Z's Checkpoint name and
    # VAE axes): each a dict of `sd_model_checkpoint` and/or `sd_vae`. The app resolves each to its files and sends
    # them with the script (`backend.service`); the engine switches the job's model between generations.
    models: list[dict] = field(default_factory=list)
    # The always-on scripts some generations run with instead of the job's (X/Y/Z plot's extension axes, e.g.
    # "[ControlNet] Weight"): {key: (the words naming them in an error, their `alwayson_scripts`)}. The app parses
    # each like a job's (`backend.service`) and sends them by key; the script gives a generation its key's scripts.
    always_on: dict[Any, tuple[str, dict]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScriptSpec:
    title: str  # A1111's title; /sdapi/v1/scripts lists it in lower case, requests name it in any case
    tabs: tuple[str, ...]
    args: tuple[ScriptArg, ...]
    engine: bool  # True: run by backend/engine/scripts; False: read by the img2img pipeline from the request
    # (request, {key: checked value}) -> PreparedScript: checks across arguments and parsing (engine scripts).
    prepare: Callable[[Any, dict], PreparedScript] | None = None
    description: str = ""

    @property
    def name(self) -> str:
        return self.title.lower()

    def check_args(self, values: list | None) -> list:
        """A1111's `script_args`, checked and coerced, with the defaults filling missing trailing values."""
        values = list(values or [])
        if len(values) > len(self.args):
            raise UserError(f"Script '{self.title}' takes {len(self.args)} script_args "
                            f"({', '.join(a.label for a in self.args)}), got {len(values)}.", status=422)
        checked = []
        for i, spec in enumerate(self.args):
            value = values[i] if i < len(values) else spec.default
            if value is None and spec.kind not in ("info", "textbox"):
                value = spec.default  # a null (a client's "unset") takes the control's default
            checked.append(spec.check(value, f"{self.title} script_args[{i}]: {spec.label.lower()}"))
        return checked

    def values(self, checked: list) -> dict:
        return {spec.key: value for spec, value in zip(self.args, checked)}


def _listing(choices) -> str:
    return ", ".join(repr(c) for c in choices)


# -- the scripts --------------------------------------------------------------------------------------------------

OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
LOOPBACK_CURVES = ("Aggressive", "Linear", "Lazy")


def _prepare_prompts_from_file(req, values: dict) -> PreparedScript:
    from backend.core.prompt_file_lines import line_requests
    lines = line_requests(req, values)
    return PreparedScript(args={**values, "lines": [update for update, _ in lines]},
                          requests=[(f"Prompts from file or textbox: line {n}", line_req)
                                    for n, (_, line_req) in enumerate(lines, 1)],
                          images=sum(r.batch_size * r.n_iter for _, r in lines))


def prompt_matrix_combinations(text: str, put_at_start: bool, delimiter: str) -> tuple[list[str], list[str]]:
    """Prompt matrix: -> (the prompt's `|`-separated parts, one prompt per combination), in A1111's order: bit i
    of combination n selects variable part i; the variable parts go after the first part, or before it."""
    parts = text.split("|")
    prompts = []
    for number in range(2 ** (len(parts) - 1)):
        selected = [part.strip().strip(",") for i, part in enumerate(parts[1:]) if number & (1 << i)]
        selected = selected + [parts[0]] if put_at_start else [parts[0]] + selected
        prompts.append(delimiter.join(selected))
    return parts, prompts


MAX_MATRIX_PARTS = 10  # 2^10 = 1024 pictures, past the default images-per-job limit already


def _prepare_prompt_matrix(req, values: dict) -> PreparedScript:
    positive = values["prompt_type"] == "positive"
    text = req.prompt if positive else req.negative_prompt
    variable = len(text.split("|")) - 1
    if variable > MAX_MATRIX_PARTS:
        raise UserError(f"Prompt matrix: {variable} variable parts (separated by |) would make 2^{variable} "
                        f"pictures; use at most {MAX_MATRIX_PARTS}.", status=422)
    delimiter = ", " if values["variations_delimiter"] == "comma" else " "
    _, prompts = prompt_matrix_combinations(text, values["put_at_start"], delimiter)
    field_name = "prompt" if positive else "negative_prompt"
    return PreparedScript(args=values, images=len(prompts),  # each combination's prompt is checked like the job's
                          requests=[(f"Prompt matrix: combination {n} ({prompt!r})",
                                     req.model_copy(update={field_name: prompt, "batch_size": 1, "n_iter": 1}))
                                    for n, prompt in enumerate(prompts)])


def _prepare_outpainting_mk2(req, values: dict) -> PreparedScript:
    if not values["direction"]:
        raise UserError("Outpainting mk2: choose at least one outpainting direction (left, right, up, down).",
                        status=422)
    return PreparedScript(args=values, images=req.batch_size * req.n_iter)


def _prepare_loopback(req, values: dict) -> PreparedScript:
    return PreparedScript(args=values, images=values["loops"] * req.n_iter)


SCRIPTS: tuple[ScriptSpec, ...] = (
    ScriptSpec("Prompt matrix", ("txt2img", "img2img"), (
        ScriptArg("put_at_start", "Put variable parts at start of prompt", "checkbox", False),
        ScriptArg("different_seeds", "Use different seed for each picture", "checkbox", False),
        ScriptArg("prompt_type", "Select prompt", "radio", "positive", choices=("positive", "negative")),
        ScriptArg("variations_delimiter", "Select joining char", "radio", "comma", choices=("comma", "space")),
        ScriptArg("margin_size", "Grid margins (px)", "slider", 0, minimum=0, maximum=500, step=2, accept=(0, 2048)),
    ), engine=True, prepare=_prepare_prompt_matrix, description="Separate prompt parts with |: one picture for each combination of the parts after "
                                "the first, in a grid with the parts as legends."),
    ScriptSpec("Prompts from file or textbox", ("txt2img", "img2img"), (
        ScriptArg("checkbox_iterate", "Iterate seed every line", "checkbox", False),
        ScriptArg("checkbox_iterate_batch", "Use same random seed for all lines", "checkbox", False),
        ScriptArg("prompt_position", "Insert prompts at the", "radio", "start", choices=("start", "end")),
        ScriptArg("prompt_txt", "List of prompt inputs", "textbox", "", lines=6, upload=True),
    ), engine=True, prepare=_prepare_prompts_from_file,
        description='One job per line; a line may set options: --prompt "..." --negative_prompt "..." --steps 10 '
                    '--seed 5 --cfg_scale 7 --sampler_name "Euler a" --width 512 --height 512 ...'),
    ScriptSpec("Loopback", ("img2img",), (
        ScriptArg("loops", "Loops", "slider", 4, minimum=1, maximum=32, step=1, accept=(1, 1000)),
        ScriptArg("final_denoising_strength", "Final denoising strength", "slider", 0.5, minimum=0, maximum=1,
                  step=0.01),
        ScriptArg("denoising_curve", "Denoising strength curve", "dropdown", "Linear", choices=LOOPBACK_CURVES),
        ScriptArg("append_interrogation", "Append interrogated prompt at each iteration", "dropdown", "None",
                  choices=("None", "CLIP", "DeepBooru")),
    ), engine=True, prepare=_prepare_loopback,
        description="Each picture is the next one's input, the denoising strength moving to the final one."),
    ScriptSpec("Poor man's outpainting", ("img2img",), (
        ScriptArg("pixels", "Pixels to expand", "slider", 128, minimum=8, maximum=256, step=8,
                  accept=(8, 2048)),
        ScriptArg("mask_blur", "Mask blur", "slider", 4, minimum=0, maximum=64, step=1, accept=(0, 256)),
        ScriptArg("inpainting_fill", "Masked content", "radio", 0, choices=MASKED_CONTENT, index=True),
        ScriptArg("direction", "Outpainting direction", "checkboxgroup", list(OUTPAINT_DIRECTIONS),
                  choices=OUTPAINT_DIRECTIONS),
    ), engine=False, description="Grow the picture outwards and inpaint the new border."),
    ScriptSpec("Outpainting mk2", ("img2img",), (
        ScriptArg("info", "Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: 0.8",
                  "info"),
        ScriptArg("pixels", "Pixels to expand", "slider", 128, minimum=8, maximum=256, step=8,
                  accept=(8, 2048)),
        ScriptArg("mask_blur", "Mask blur", "slider", 8, minimum=0, maximum=64, step=1, accept=(0, 256)),
        ScriptArg("direction", "Outpainting direction", "checkboxgroup", list(OUTPAINT_DIRECTIONS),
                  choices=OUTPAINT_DIRECTIONS),
        ScriptArg("noise_q", "Fall-off exponent (lower=higher detail)", "slider", 1.0, minimum=0, maximum=4,
                  step=0.01),
        ScriptArg("color_variation", "Color variation", "slider", 0.05, minimum=0, maximum=1, step=0.01),
    ), engine=True, prepare=_prepare_outpainting_mk2,
        description="Grow the picture outwards, one side per pass; each new border starts as noise matched to "
                    "the picture. Recommended: 80-100 steps, Euler a, denoising strength 0.8."),
    ScriptSpec("SD upscale", ("img2img",), (
        ScriptArg("info", "Will upscale the image by the selected scale factor; use width and height sliders to "
                          "set tile size", "info"),
        ScriptArg("overlap", "Tile overlap", "slider", 64, minimum=0, maximum=256, step=16),
        ScriptArg("upscaler_index", "Upscaler", "upscaler", "None"),
        ScriptArg("scale_factor", "Scale Factor", "slider", 2.0, minimum=1.0, maximum=4.0, step=0.05),
    ), engine=False, description="Upscale, then redraw the picture in tiles of Width x Height."),
)


# The settings whose axes (Checkpoint name, VAE) make cells run with another model than the job's.
MODEL_SETTINGS = ("sd_model_checkpoint", "sd_vae")


def xyz_model_choices(plan) -> list[dict]:
    """The model settings (`sd_model_checkpoint`, `sd_vae`) the plan's cells set, each combination once, in the
    order the cells run (empty when no axis chooses a model)."""
    choices: dict[tuple, dict] = {}
    for cell in plan.cells():
        chosen: dict[str, Any] = {}
        for axis, index in zip(plan.axes, cell):
            if not axis.is_nothing and axis.type.setting in MODEL_SETTINGS:
                chosen[axis.type.setting] = axis.values[index]
        if chosen:
            choices.setdefault(tuple(sorted(chosen.items())), chosen)
    return list(choices.values())


def xyz_plot_specs(catalogs: Callable[[], Any], max_images: Callable[[], int], extra_axes=()) -> list[ScriptSpec]:
    """The X/Y/Z plot, one spec per tab (txt2img and img2img list different axes, in A1111's order): its 18
    `script_args` in A1111's order; `prepare` parses and checks every axis value (`backend.core.xyz_axes`) against
    the app's catalogs (`catalogs()`: an `XYZCatalogs` of checkpoint, VAE and upscaler names) and the images-per-job
    limit, before any image is made; the checkpoints and VAEs its cells run with (Checkpoint name and VAE axes) go
    in `PreparedScript.models`, which the app resolves to files. `extra_axes`: the enabled extensions' axes (`AxisType`s
    with `script`, after A1111's); the always-on scripts of their cells go in `PreparedScript.always_on`, one entry
    per combination of their values."""
    from backend.core.xyz_axes import SCRIPT_TITLE, XYZ_ARG_NAMES, cell_request, parse_xyz_args, xyz_arg_specs

    def prepare_for(img2img: bool) -> Callable[[Any, dict], PreparedScript]:
        def prepare(req, values: dict) -> PreparedScript:
            try:
                plan = parse_xyz_args([values[name] for name in XYZ_ARG_NAMES], req, catalogs(), is_img2img=img2img,
                                      max_images=max_images(), extra_axes=extra_axes)
            except UserError as exc:  # a script argument the edge refuses: 422, as the other scripts' arguments
                raise UserError(exc.message, status=422 if exc.status == 400 else exc.status) from None
            # Every cell is checked at the edge like the job's own request (and its sampler resolved there).
            cells = [(f"X/Y/Z plot: cell {ix + 1},{iy + 1},{iz + 1}",
                      cell_request(req, [(plan.x.type, plan.x.values[ix], plan.x.values),
                                         (plan.y.type, plan.y.values[iy], plan.y.values),
                                         (plan.z.type, plan.z.values[iz], plan.z.values)]))
                     for ix, iy, iz in plan.cells()]
            variants: dict[Any, tuple[str, dict]] = {}
            for cell, (_label, cell_req) in zip(plan.cells(), cells):
                key = plan.always_on_key(cell)
                if key is not None and key not in variants:
                    named = ", ".join(f"{a.name} axis ({a.type.label}) value {a.values[i]!r}"
                                      for a, i in zip(plan.axes, cell) if a.type.script)
                    variants[key] = (f"X/Y/Z plot: {named}", cell_req.alwayson_scripts)
            return PreparedScript(args=plan.portable(), requests=cells, models=xyz_model_choices(plan),
                                  always_on=variants)
        return prepare

    return [ScriptSpec(SCRIPT_TITLE, (tab,), tuple(xyz_arg_specs(tab == "img2img", extra_axes)), engine=True,
                       prepare=prepare_for(tab == "img2img"),
                       description="One picture per combination of the X, Y and Z values, in a grid with the values as "
                                   "legends.")
            for tab in TABS]


class ScriptCatalog:
    """The selectable scripts by tab; `add` plugs another one in (the X/Y/Z plot)."""

    def __init__(self, scripts: tuple[ScriptSpec, ...] | list[ScriptSpec] = SCRIPTS):
        self.scripts: list[ScriptSpec] = list(scripts)
        # always-on scripts listed beside them (A1111 lists those too; they are never a `script_name`)
        self.always_on: list[ScriptSpec] = []

    def add_always_on(self, spec: ScriptSpec) -> None:
        self.always_on.append(spec)

    def add(self, spec: ScriptSpec) -> None:
        """Add `spec`, in place of a script of the same name in the same tabs (a script may differ between tabs)."""
        self.scripts = [s for s in self.scripts
                        if s.name != spec.name or not set(s.tabs) & set(spec.tabs)] + [spec]

    def for_tab(self, tab: str) -> list[ScriptSpec]:
        return [s for s in self.scripts if tab in s.tabs]

    def find(self, name: str | None, tab: str) -> ScriptSpec | None:
        """The script a request names (any case; None for no script); an unknown name is A1111's 422."""
        wanted = (name or "").strip().lower()
        if not wanted or wanted == "none":
            return None
        for spec in self.for_tab(tab):
            if spec.name == wanted:
                return spec
        raise UserError(f"Script '{name}' not found. Scripts for {tab}: "
                        f"{', '.join(s.title for s in self.for_tab(tab))}.", status=SCRIPT_NOT_FOUND_STATUS)

    def scripts_list(self) -> dict:
        """GET /sdapi/v1/scripts: {"txt2img": [...], "img2img": [...]}, lower-case titles as A1111 returns them."""
        return {tab: [s.name for s in self.for_tab(tab)] + [s.name for s in self.always_on if tab in s.tabs]
                for tab in TABS}

    def script_info(self, dynamic_choices: dict[str, tuple] | None = None) -> list[dict]:
        """GET /sdapi/v1/script-info: one entry per script and tab it shows in, as A1111's."""
        dynamic = dynamic_choices or {}
        return [{"name": s.name, "is_alwayson": False, "is_img2img": tab == "img2img",
                 "args": [a.info(dynamic.get(a.kind)) for a in s.args]}
                for tab in TABS for s in self.for_tab(tab)] + \
               [{"name": s.name, "is_alwayson": True, "is_img2img": tab == "img2img",
                 "args": [a.info(dynamic.get(a.kind)) for a in s.args]}
                for tab in TABS for s in self.always_on if tab in s.tabs]



def check_alwayson_names(alwayson_scripts: dict | None, tab: str, extra: dict[str, bool] | None = None, *,
                         native: dict[str, bool] | None = None) -> None:
    """A1111 answers 422 for an `alwayson_scripts` entry it has no always-on script for in the tab, and for a
    selectable script named there; Easel does the same (its always-on scripts: `native`, those the enabled
    extensions' easel_extension.py registered, by default `ignored_inputs.ALWAYSON_SCRIPTS`, the built-in ones;
    and `extra`, the extensions' AlwaysVisible scripts: {name: runs in txt2img too})."""
    from backend.core.ignored_inputs import ALWAYSON_SCRIPTS

    ALWAYSON_SCRIPTS = {**(ALWAYSON_SCRIPTS if native is None else native), **(extra or {})}
    for key in alwayson_scripts or {}:
        runs_in_txt2img = ALWAYSON_SCRIPTS.get(str(key).strip().lower())
        if runs_in_txt2img is None or not (tab == "img2img" or runs_in_txt2img):
            known = ", ".join(k for k, both in ALWAYSON_SCRIPTS.items() if tab == "img2img" or both)
            selectable = any(s.name == str(key).strip().lower() for s in SCRIPTS)
            why = ("Cannot have a selectable script in the always on scripts params" if selectable
                   else f"always on script {key} not found")
            raise UserError(f"{why} (always-on scripts in {tab}: {known}).", status=422)
