"""Typed Extras requests and results, shared by the UI, the API and the backend.

Field names and defaults are A1111's (`ExtrasBaseRequest`, `ExtrasSingleImageRequest`,
`ExtrasBatchImagesRequest` in its `modules/api/models.py`), so its clients work unchanged.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from backend.core.schemas import JsonRequest


class ExtrasRequest(JsonRequest):
    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: scale to upscaling_resize_w x h")
    show_extras_results: bool = Field(True, description="Return the resulting images")
    gfpgan_visibility: float = Field(0.0, ge=0, le=1, description="GFPGAN strength (0: off)")
    codeformer_visibility: float = Field(0.0, ge=0, le=1, description="CodeFormer strength (0: off)")
    codeformer_weight: float = Field(0.0, ge=0, le=1, description="CodeFormer weight (0: strongest effect, 1: weakest)")
    upscaling_resize: float = Field(2.0, ge=1, le=8, description="Scale factor (resize_mode 0)")
    upscaling_resize_w: int = Field(512, ge=1, description="Target width (resize_mode 1)")
    upscaling_resize_h: int = Field(512, ge=1, description="Target height (resize_mode 1)")
    upscaling_crop: bool = Field(True, description="Crop to fit the target size (resize_mode 1)")
    upscaler_1: str = Field("None", description="First upscaler (GET /sdapi/v1/upscalers)")
    upscaler_2: str = Field("None", description="Second upscaler, blended over the first")
    extras_upscaler_2_visibility: float = Field(0.0, ge=0, le=1, description="Visibility of the second upscaler")
    upscale_first: bool = Field(False, description="Upscale before restoring faces (else restore first)")


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = Field("", description="Base64-encoded image")


class FileData(BaseModel):
    data: str = Field(..., description="Base64-encoded image")
    name: str = Field("", description="File name")


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(default_factory=list, description="Images to process")


class ExtrasImage(BaseModel):
    png: bytes  # PNG with the `parameters` and `extras` text chunks
    name: str
    infotext: str  # the post-processing steps, e.g. "Postprocess upscale by: 4, Postprocess upscaler: R-ESRGAN 4x+"
    saved_path: str | None = None
    notes: list[str] = Field(default_factory=list)


class ExtrasResult(BaseModel):
    images: list[ExtrasImage]
    html_info: str = ""
    warnings: list[str] = Field(default_factory=list)
    interrupted: bool = False
