"""The engine side of selectable scripts (A1111's Script dropdown): scripts that run the ordinary pipeline
several times in one job and compose what it returns (X/Y/Z plot, Prompt matrix, Prompts from file or textbox,
Loopback, Outpainting mk2).

The app checks a request's `script_name` and `script_args` (`backend.core.scripts_catalog`) and sends the
script in the payload as `{"name": lower-case title, "args": what its spec prepared}`. `ENGINE_SCRIPTS` maps
the name to a module with `run(args, job, generate) -> GenerationResult`:

- `job` is the `ScriptRun` (`runner.py`): the job's request, kind, init images and mask, its `JobContext`,
  `plan(job_count, total_steps)` for the one progress bar over all generations, grid saving;
- `generate(request, ...)` runs the pipeline for a changed request in this process and returns its
  `GenerationResult` (images with their infotexts). After Interrupt it raises `ScriptStopped`, which `run_script`
  turns into the images made so far; Skip skips the picture being made, as in a plain job.

Plugging a script in: its `ScriptSpec` in `backend/core/scripts_catalog.py` and its module here.
"""
from __future__ import annotations

import importlib

# Script name (lower case, as /sdapi/v1/scripts lists it) -> module with `run(args, job, generate)`.
ENGINE_SCRIPTS: dict[str, str] = {
    "prompt matrix": "backend.engine.scripts.prompt_matrix",
    "prompts from file or textbox": "backend.engine.scripts.prompts_from_file",
    "loopback": "backend.engine.scripts.loopback",
    "outpainting mk2": "backend.engine.scripts.outpainting_mk2",
    "x/y/z plot": "backend.engine.scripts.xyz_plot",
}
A1111_SCRIPT = "backend.engine.scripts.a1111"  # runs an extension's A1111 `Script.run(p, *args)`


def run_script(kind: str, payload: dict, ctx, run_pipeline):
    """Run the payload's script; `run_pipeline(payload)` runs the ordinary pipeline for a payload."""
    from backend.engine.scripts.runner import ScriptRun

    from modules.script_loading import ScriptCall

    script = payload["script"]
    # an AUTOMATIC1111 script from an extension (`modules/`) carries a ScriptCall; Easel's own are listed above
    a1111 = isinstance(script["args"], ScriptCall)
    module = importlib.import_module(A1111_SCRIPT if a1111 else ENGINE_SCRIPTS[script["name"]])
    name = script["args"].title if a1111 else script["name"]  # errors name an extension's script by its title
    return ScriptRun(kind, payload, ctx, run_pipeline).run(name, module.run, script["args"])
