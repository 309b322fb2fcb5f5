"""ControlNet: model files, preprocessors, units, and per-step application (sd-webui-controlnet compatible)."""
