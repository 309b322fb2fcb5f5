"""Post-processing of finished images as the app sees it (no torch): what is on offer, and Extras jobs.

- `model_files`: which files count as post-processing models; the face restorers offered.
- `upscaler_catalog`: the upscalers (None, Lanczos, Nearest, model files) and the size limit of their output.
- `schemas`: the Extras request and result.
- `service`: the app process's side (lists for the UI/API, Extras jobs checked and queued).

The backend runs them (`backend.engine.postprocess`): loading the files with spandrel, tiled upscaling,
face detection and restoration, the Extras job.
"""
