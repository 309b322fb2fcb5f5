"""Easel's own route for the Checkpoint Merger (AUTOMATIC1111 has the tab but no API route for it).

POST `/easel/v1/merge-checkpoints` with a `MergeRequest` body (the tab's fields, A1111's `run_modelmerger` argument
names) -> {"title", "name", "path", "message", "warnings"} once the new checkpoint is saved and listed. Errors in
A1111's JSON shape: 4xx for a missing model, a family mix, tensors that do not fit, a bad name or regular
expression, a file that exists (409), an interrupted merge.
"""
from __future__ import annotations

from fastapi import APIRouter

from api.errors import A1111Route
from api.jobs import run_job
from backend.core.checkpoint_merge import MergeRequest
from backend.service import EaselService


def build_merger_router(service: EaselService, dependencies: list | None = None,
                        log_requests: bool = False) -> APIRouter:
    route_class = type("EaselApiRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/easel/v1", dependencies=dependencies or [], route_class=route_class)

    @router.post("/merge-checkpoints")
    async def merge_checkpoints(req: MergeRequest) -> dict:
        result = await run_job(service.submit_merge, req)
        return merged_answer(service, result)

    return router


def merged_answer(service: EaselService, result: dict) -> dict:
    """The merge job's result with the new checkpoint's title as the lists show it."""
    found = service.registry.find_checkpoint(result["path"])
    return {"title": found.title, "name": found.name, "path": result["path"],
            "message": f"Checkpoint saved to {result['path']}", "warnings": result.get("warnings", [])}
