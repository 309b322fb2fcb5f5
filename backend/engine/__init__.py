"""The engine: everything that runs in the backend process and touches torch (the worker loop, pipelines, device
policy, model loading, sampler math, and the ControlNet, LoRA and post-processing runtimes).

The app process never imports this package; it reaches the engine only through `backend.client`, which starts
`backend.engine.worker` in its own process.
"""
