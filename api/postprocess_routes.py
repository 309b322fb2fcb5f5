"""Post-processing routes under /sdapi/v1, in A1111's shapes.

POST `extra-single-image` ({html_info, image}), `extra-batch-images` ({html_info, images});
GET `upscalers` ([{name, model_name, model_path, model_url, scale}]), `face-restorers` ([{name, cmd_dir}]),
`realesrgan-models` ([{name, path, scale}]). As in A1111, the API returns the images without saving them.
"""
from __future__ import annotations

import base64

from fastapi import APIRouter

from api.errors import A1111Route
from api import models
from api.jobs import run_job
from backend.core.errors import UserError
from backend.core.image_codec import decode_base64_image
from backend.core.images import reencode_png
from backend.postprocess.schemas import ExtrasBatchImagesRequest, ExtrasRequest, ExtrasSingleImageRequest
from backend.service import EaselService

_BASE_FIELDS = set(ExtrasRequest.model_fields)


def _base(req: ExtrasRequest) -> ExtrasRequest:
    return ExtrasRequest(**req.model_dump(include=_BASE_FIELDS))


def build_postprocess_router(service: EaselService, dependencies: list | None = None,
                             log_requests: bool = False) -> APIRouter:
    route_class = type("EaselApiRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [], route_class=route_class)
    post = service.postprocess

    @router.post("/extra-single-image", response_model=models.ExtrasSingleImageResponse)
    async def extra_single_image(req: ExtrasSingleImageRequest) -> dict:
        if not req.image or not req.image.strip():
            raise UserError("extra-single-image: the request has no image.")

        def submit():
            return post.submit_extras(_base(req), [("image", decode_base64_image(req.image, "image"))], save=False)

        result = await run_job(submit)
        png = result.images[0].png if result.images else b""
        data = reencode_png(png, None, service.api_image_format())  # samples_format, as A1111's API
        return {"html_info": result.html_info, "image": base64.b64encode(data).decode() if png else ""}

    @router.post("/extra-batch-images", response_model=models.ExtrasBatchImagesResponse)
    async def extra_batch_images(req: ExtrasBatchImagesRequest) -> dict:
        if not req.imageList:
            raise UserError("extra-batch-images: imageList is empty.")

        def submit():
            images = [(item.name or f"image-{i + 1}", decode_base64_image(item.data, f"imageList[{i}]"))
                      for i, item in enumerate(req.imageList)]
            return post.submit_extras(_base(req), images, save=False)

        result = await run_job(submit)
        fmt = service.api_image_format()
        return {"html_info": result.html_info,
                "images": [base64.b64encode(reencode_png(img.png, None, fmt)).decode() for img in result.images
                           if img.png]}

    @router.get("/upscalers", response_model=list[models.UpscalerItem])
    def upscalers() -> list[dict]:
        return [u.as_api() for u in post.upscalers()]

    @router.get("/face-restorers", response_model=list[models.FaceRestorerItem])
    def face_restorers() -> list[dict]:
        return post.face_restorers()

    @router.get("/realesrgan-models", response_model=list[models.RealesrganItem])
    def realesrgan_models() -> list[dict]:
        return post.realesrgan_models()

    return router
