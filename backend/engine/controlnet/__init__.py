"""ControlNet in the backend process: loading the control models, the annotators, applying units to the denoiser."""
