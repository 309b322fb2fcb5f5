"""`POST /sdapi/v1/interrogate` in A1111's shape: {"image": base64 or data URL, "model"} -> {"caption"}.

As A1111: a request without an image is a 404 "Image not found", an unknown model a 404 "Model not found".
"""
from __future__ import annotations

from fastapi import APIRouter

from api.errors import A1111Route
from api.jobs import run_job
from backend.core.errors import UserError
from backend.core.image_codec import decode_base64_image
from backend.interrogate.schemas import InterrogateRequest, InterrogateResponse
from backend.service import EaselService


def build_interrogate_router(service: EaselService, dependencies: list | None = None,
                             log_requests: bool = False) -> APIRouter:
    route_class = type("EaselApiRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [], route_class=route_class)

    @router.post("/interrogate", response_model=InterrogateResponse)
    async def interrogate(req: InterrogateRequest) -> InterrogateResponse:
        if req.image is None or not req.image.strip():
            raise UserError("Image not found", status=404)

        def submit():
            return service.interrogate.submit_interrogate(decode_base64_image(req.image, "image"), req.model)

        result = await run_job(submit)
        return InterrogateResponse(caption=result["caption"])

    return router
