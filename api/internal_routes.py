"""AUTOMATIC1111's `POST /internal/progress`: the progress of one task, named by the id its request gave
(`force_task_id`, A1111 1.6+) -- {active, queued, completed, progress, eta, live_preview, id_live_preview,
textinfo}. A1111's own page polls it; clients that name their tasks use it to follow their own job."""
from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.errors import A1111Route
from backend.core.schemas import JsonRequest


class InternalProgressRequest(JsonRequest):
    model_config = ConfigDict(extra="ignore")

    id_task: str | None = Field(default=None, title="Task ID", description="id of the task to get progress for")
    id_live_preview: int = Field(default=-1, title="Live preview image ID",
                                 description="id of last received live preview image")
    live_preview: bool = Field(default=True, title="Include live preview", description="whether to include the preview")


class InternalProgressResponse(BaseModel):
    active: bool = Field(title="Whether the task is being worked on right now")
    queued: bool = Field(title="Whether the task is in queue")
    completed: bool = Field(title="Whether the task has already finished")
    progress: float | None = Field(default=None, title="Progress", description="The progress with a range of 0 to 1")
    eta: float | None = Field(default=None, title="ETA in secs")
    live_preview: str | None = Field(default=None, title="Live preview image", description="Current live preview; a data: uri")
    id_live_preview: int | None = Field(default=None, title="Live preview image ID",
                                        description="Send this together with next request to prevent receiving same image")
    textinfo: str | None = Field(default=None, title="Info text", description="Info text used by WebUI.")


def build_internal_progress_router(client, dependencies: list | None = None, log_requests: bool = False) -> APIRouter:
    """`client`: the backend client (`backend.client.BackendClient`), which knows the queued, running and recently
    finished jobs."""
    route_class = type("EaselInternalRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/internal", dependencies=dependencies or [], route_class=route_class)

    @router.post("/progress", response_model=InternalProgressResponse)
    def progress(req: InternalProgressRequest) -> dict:
        return client.task_progress(req.id_task or "", req.id_live_preview, req.live_preview)

    return router
