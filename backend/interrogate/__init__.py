"""Interrogation as the app process sees it (no torch): the request, and jobs for the backend.

- `schemas`: A1111's `InterrogateRequest` / `InterrogateResponse`;
- `service`: checks a request and queues the "interrogate" job, which the backend runs
  (`backend.engine.interrogate`).
"""
