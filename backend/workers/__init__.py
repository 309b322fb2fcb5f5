"""The backend workers behind the app's one job queue (`backend.client.BackendClient`).

A worker owns one device and runs one job at a time. Two transports carry jobs to it and its events back, with the
same events (`ready`, `progress`, `result`, `error`, `dead`) delivered to the pool's one handler:

- `local.LocalWorker`: a spawned backend process on this machine (`backend.engine.worker.worker_main`);
- `ray_actor.RayWorker`: a Ray actor on a cluster (`--ray-address`), imported only then (ray is not needed
  otherwise).

`base.WorkerHandle` is what the pool sees of either: name, pid, device, state, jobs done, loaded checkpoints.
Nothing here imports torch or the engine.
"""
