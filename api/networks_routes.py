"""A1111's extra-network routes: LoRA, hypernetwork and textual-inversion lists and their refresh.

GET `/sdapi/v1/loras` ([{name, alias, path, metadata}]), POST `/sdapi/v1/refresh-loras`,
GET `/sdapi/v1/hypernetworks` ([{name, path}]),
GET `/sdapi/v1/embeddings` ({"loaded": {...}, "skipped": {...}}), POST `/sdapi/v1/refresh-embeddings`.
`<lora:...>` and `<hypernet:...>` tags in txt2img/img2img prompts are applied by the backend for every job.
"""
from __future__ import annotations

from fastapi import APIRouter

from api import models
from api.errors import A1111Route
from backend.service import EaselService


def build_networks_router(service: EaselService, dependencies: list | None = None, log_requests: bool = False) -> APIRouter:
    route_class = type("EaselNetworksRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [], route_class=route_class)

    @router.get("/loras", response_model=list[models.LoraItem])
    def loras() -> list[dict]:
        return service.lora_list()

    @router.post("/refresh-loras")
    def refresh_loras() -> dict:
        service.refresh_loras()
        return {}

    @router.get("/hypernetworks", response_model=list[models.HypernetworkItem])
    def hypernetworks() -> list[dict]:
        return service.hypernetwork_list()

    @router.get("/embeddings", response_model=models.EmbeddingsResponse)
    def embeddings() -> dict:
        return service.embedding_list()

    @router.post("/refresh-embeddings")
    def refresh_embeddings() -> dict:
        service.refresh_embeddings()
        return {}

    return router
