"""AUTOMATIC1111's `modules` namespace, as a thin compatibility layer over Easel's own interfaces, so that small
A1111 scripts kept in `extensions/NAME/scripts/*.py` run unchanged (`import modules.scripts as scripts`,
`from modules.processing import process_images`, `from modules.shared import opts, state`, ...).

What a script may use is listed in each module's `__all__` (and `PROVIDED`, with the names read when asked for:
`shared.sd_model`, `devices.device`, ...); any other name raises an error naming it
(`modules.shared.sd_model is not available in Easel's AUTOMATIC1111 compatibility layer`), so a script that needs
more fails to load with that message and is skipped, and the rest of the UI loads.

The layer holds no engine state: what a script's code reaches through it (the job's settings, `process_images`,
the interrupt flag) comes from the `ScriptContext` the process running the script sets for the duration of the
call (`modules.context`); in the app process, extension code running outside such a call (a route added by
`on_app_started`, a tab's event handler) reads the app's default context (the live settings, the flags). Importing
the layer imports neither torch nor Gradio (`modules.devices` imports torch, `modules.ui_components` Gradio, when a
script first uses one of their names).
"""
