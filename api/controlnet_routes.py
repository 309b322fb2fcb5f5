"""sd-webui-controlnet's HTTP routes (`/controlnet/...`, without the /sdapi/v1 prefix, as the extension has them).

GET `version`, `model_list`, `module_list`, `control_types`, `settings`; POST `detect`, `render_openpose_json`.
Units themselves travel in txt2img/img2img requests (`alwayson_scripts.controlnet.args`).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool
from pydantic import ConfigDict, Field

from api.errors import A1111Route
from api.jobs import run_job
from backend.controlnet.service import API_VERSION, detected_maps_and_poses
from backend.core.errors import UserError
from backend.core.image_codec import decode_base64_image, encode_png_base64
from backend.core.openpose_drawing import render_pose_json
from backend.core.safe_values import check_value
from backend.core.schemas import JsonRequest
from backend.service import EaselService


class DetectRequest(JsonRequest):
    """POST /controlnet/detect, with the extension's field names and defaults."""

    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_masks: list[str] | None = None
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = 64
    controlnet_threshold_b: float = 64
    low_vram: bool = False


def build_controlnet_router(service: EaselService, dependencies: list | None = None, log_requests: bool = False) -> APIRouter:
    route_class = type("EaselControlNetRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/controlnet", dependencies=dependencies or [], route_class=route_class)
    cn = service.components["controlnet"]

    @router.get("/version")
    def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True) -> dict:
        if update:
            cn.refresh()
        return {"model_list": cn.registry.titles()}

    @router.get("/module_list")
    def module_list(alias_names: bool = False) -> dict:
        return {"module_list": cn.module_names(alias_names), "module_detail": cn.module_detail(alias_names)}

    @router.get("/control_types")
    def control_types() -> dict:
        return {"control_types": cn.control_types()}

    @router.get("/settings")
    def settings() -> dict:
        return {"control_net_unit_count": int(service.options["control_net_unit_count"]),
                "control_net_max_models_num": int(service.options["control_net_unit_count"])}

    @router.post("/detect")
    async def detect(req: DetectRequest) -> dict:
        if not req.controlnet_input_images:
            raise UserError("detect: controlnet_input_images is empty; send at least one base64 image.")

        def submit():
            images = [decode_base64_image(data, f"controlnet_input_images[{i}]")
                      for i, data in enumerate(req.controlnet_input_images)]
            return cn.submit_detect(req.controlnet_module, images, req.controlnet_processor_res,
                                    req.controlnet_threshold_a, req.controlnet_threshold_b)

        results, poses = detected_maps_and_poses(await run_job(submit))
        body = {"images": [encode_png_base64(img) for img in results], "info": "Success"}
        if poses:  # pose preprocessors: the people found, in OpenPose JSON (as the extension returns them)
            body["poses"] = poses
        return body

    @router.post("/render_openpose_json")
    async def render_openpose_json(pose_data: Any = Body(default_factory=list)) -> dict:
        """OpenPose JSON documents (the list itself is the body, as the extension reads it) drawn as the openpose
        preprocessor draws detected people: {"images": [base64 PNG per document], "info": "Success"}."""
        if isinstance(pose_data, dict) and "pose_data" in pose_data:  # the list embedded under its parameter name
            pose_data = pose_data["pose_data"]
        if isinstance(pose_data, dict):  # one document alone
            pose_data = [pose_data]
        check_value(pose_data, "pose_data")  # NaN, Infinity, integers beyond 64 bits: a 422 naming the field
        if not isinstance(pose_data, list):
            raise UserError("render_openpose_json: the body must be a list of OpenPose JSON objects.", status=422)
        if not pose_data:
            return {"info": "No pose data detected."}

        def draw() -> list[str]:  # a few milliseconds per canvas: in the thread pool, not on the event loop
            from PIL import Image
            return [encode_png_base64(Image.fromarray(render_pose_json(pose, f"pose_data[{i}]")))
                    for i, pose in enumerate(pose_data)]

        return {"images": await run_in_threadpool(draw), "info": "Success"}

    return router
