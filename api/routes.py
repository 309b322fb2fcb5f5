"""/sdapi/v1 routes, with AUTOMATIC1111's paths, fields and response shapes."""
from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from api.errors import A1111Route
from api import models
from api.jobs import run_job
from backend.core.errors import UserError
from backend.core.image_codec import decode_base64_image
from backend.core.images import reencode_png
from backend.core.request_checks import LATENT_UPSCALE_MODES
from backend.core.schemas import Img2ImgRequest, JsonRequest, Txt2ImgRequest
from backend.service import EaselService

class Img2ImgBatchRequest(Img2ImgRequest):
    """Easel's addition: img2img over a folder (A1111 offers this in its UI only)."""

    input_dir: str
    output_dir: str = ""
    mask_dir: str = ""


class PNGInfoRequest(JsonRequest):  # A1111's name (the schema's in /openapi.json)
    image: str = ""


class OptionsBody(BaseModel):
    model_config = ConfigDict(extra="allow")


def build_router(service: EaselService, dependencies: list | None = None, log_requests: bool = False) -> APIRouter:
    route_class = type("EaselApiRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [], route_class=route_class)

    def respond(req, result, parameters: dict) -> dict:
        # in the format of the setting samples_format (png, jpg, webp; the infotext in EXIF for jpg/webp), as A1111
        fmt = service.api_image_format(req.override_settings)
        images = ([base64.b64encode(reencode_png(img.png, img.infotext, fmt)).decode() for img in result.images]
                  if req.send_images else [])
        if req.send_images:  # always-on scripts' images follow the generated ones, as A1111's scripts append them
            images += [base64.b64encode(reencode_png(png, None, fmt)).decode()
                       for png in getattr(result, "extra_images", [])]
        info = dict(result.info)
        if result.warnings:
            info["warnings"] = result.warnings
        info["interrupted"] = result.interrupted
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    def api_saving(req):
        # A1111's API saves to disk only when asked (save_images), and then also a grid.
        return req.model_copy(update={"do_not_save_samples": not req.save_images, "do_not_save_grid": not req.save_images})

    # The job routes are async: a job waiting in the queue holds no web server thread.
    # response_model: the answers' schemas named and shaped as A1111's (api.models), for SDKs generated from its schema
    @router.post("/txt2img", response_model=models.TextToImageResponse)
    async def txt2img(req: Txt2ImgRequest) -> dict:
        return respond(req, await run_job(service.submit_txt2img, api_saving(req)), req.model_dump())

    @router.post("/img2img", response_model=models.ImageToImageResponse)
    async def img2img(req: Img2ImgRequest) -> dict:
        if not req.init_images:
            raise UserError("img2img: init_images is empty; send at least one base64-encoded image.")
        result = await run_job(service.submit_img2img_base64, api_saving(req))
        parameters = req.model_dump()
        if not req.include_init_images:  # as A1111: the (large) inputs are echoed back only when asked
            parameters["init_images"] = None
            parameters["mask"] = None
        return respond(req, result, parameters)

    @router.post("/img2img-batch", response_model=models.ImageToImageResponse)
    async def img2img_batch(req: Img2ImgBatchRequest) -> dict:
        job_req = Img2ImgRequest(**req.model_dump(exclude={"input_dir", "output_dir", "mask_dir"}))
        result = await run_job(service.submit_img2img_batch, job_req, req.input_dir, req.output_dir, req.mask_dir)
        return respond(req, result, req.model_dump())

    @router.get("/progress", response_model=models.ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict:
        state = service.client.progress_state()
        if skip_current_image:
            state["current_image"] = None
        return state

    @router.get("/workers", response_model=list[models.WorkerItem])
    def workers() -> list[dict]:
        """Easel's own: the backend workers behind the queue (--backend-workers, --ray-address), with their state,
        jobs done and loaded checkpoints."""
        return service.client.workers_state()

    @router.post("/interrupt")
    def interrupt() -> dict:
        service.interrupt()
        return {}

    @router.post("/skip")
    def skip() -> dict:
        service.skip()
        return {}

    @router.get("/sd-models", response_model=list[models.SDModelItem])
    def sd_models() -> list[dict]:
        service.registry.fill_cached_hashes()  # titles carry the hash once it is known
        return [{"title": f.title, "model_name": f.model_name, "hash": f.shorthash, "sha256": f.sha256,
                 "filename": str(f.path), "config": None} for f in service.registry.checkpoints]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict:
        service.refresh_checkpoints()
        return {}

    @router.get("/sd-vae", response_model=list[models.SDVaeItem])
    def sd_vae() -> list[dict]:
        return [{"model_name": f.model_name, "filename": str(f.path)} for f in service.registry.vaes]

    @router.get("/sd-modules", response_model=list[models.SDModuleItem])
    def sd_modules() -> list[dict]:
        """Forge's list of the files of "VAE / Text Encoder" (models/VAE, models/text_encoder, models/clip)."""
        return service.parts.api_list()

    @router.post("/refresh-vae")
    def refresh_vae() -> dict:
        service.refresh_checkpoints()
        return {}

    @router.get("/prompt-styles", response_model=list[models.PromptStyleItem])
    def prompt_styles() -> list[dict]:
        return [s.as_api() for s in service.styles.all()]

    # options and flags: documented as A1111's Options / Flags schemas, answered as they are (unknown stored keys too)
    @router.get("/options", response_model=models.OptionsModel)
    def get_options() -> JSONResponse:
        # the checkpoint in use by its sd-models title, with sd_checkpoint_hash
        return JSONResponse(jsonable_encoder(service.api_options()))

    @router.post("/options")
    async def set_options(body: dict[str, Any]) -> dict:
        # as in A1111: a checkpoint or VAE change returns once the model is loaded (awaited, holding no thread)
        job = await run_in_threadpool(lambda: service.submit_options(service.posted_options(body)))
        if job is not None:
            await job.outcome()
        return {}

    @router.get("/cmd-flags", response_model=models.FlagsModel)
    def cmd_flags() -> JSONResponse:
        return JSONResponse(jsonable_encoder(
            {k: v for k, v in vars(service.args).items() if k not in ("gradio_auth", "api_auth", "unknown")}))

    @router.get("/samplers", response_model=list[models.SamplerItem])
    def samplers() -> list[dict]:
        return service.sampler_list()

    @router.get("/schedulers", response_model=list[models.SchedulerItem])
    def schedulers() -> list[dict]:
        return service.scheduler_list()

    @router.get("/scripts", response_model=models.ScriptsList)
    def scripts() -> dict:
        listed = service.selectable_scripts.scripts_list()
        for name, in_txt2img in service.native_extensions.alwayson_tabs().items():  # A1111 lists always-on ones
            for tab in ("txt2img", "img2img") if in_txt2img else ("img2img",):
                listed[tab].append(name)
        return listed

    @router.get("/script-info", response_model=list[models.ScriptInfo])
    def script_info() -> list[dict]:
        return service.selectable_scripts.script_info({"upscaler": tuple(service.postprocess.upscaler_names())})

    @router.get("/latent-upscale-modes", response_model=list[models.LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[dict]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @router.post("/png-info", response_model=models.PNGInfoResponse)
    def png_info(req: PNGInfoRequest) -> dict:
        if not req.image.strip():
            raise UserError("png-info: the request has no image.")
        img = decode_base64_image(req.image)
        text, params, extra = service.png_info(img)
        return {"info": text, "items": extra, "parameters": params}

    @router.get("/memory", response_model=models.MemoryResponse)
    async def memory() -> dict:
        return await run_job(service.submit_memory, timeout=60)

    @router.post("/unload-checkpoint")
    async def unload_checkpoint() -> dict:
        await run_job(service.submit_unload_checkpoint, timeout=600)
        return {}

    @router.post("/reload-checkpoint")
    async def reload_checkpoint() -> dict:
        await run_job(service.submit_load_checkpoint)
        return {}

    return router
