"""Typed job requests and results, shared by the UI, the API and the backend.

Field names and defaults follow AUTOMATIC1111's API (`modules/api/models.py`), so
its clients work unchanged; unknown fields are ignored, as A1111 does.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backend.core.safe_values import check_value


class JsonRequest(BaseModel):
    """A request read from JSON: non-finite numbers (NaN, Infinity), integers beyond 64 bits and lone surrogates
    are refused in any field, nested ones included (`backend.core.safe_values`), with a 422 naming the field."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsafe_values(cls, data: Any) -> Any:
        check_value(data)
        return data


class StableDiffusionProcessingTxt2Img(JsonRequest):  # A1111's name: the schema's name in /openapi.json
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    # Forge's "Distilled CFG Scale": FLUX dev's guidance input (models without one ignore it)
    distilled_cfg_scale: float = 3.5
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    sampler_index_legacy: int | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


Txt2ImgRequest = StableDiffusionProcessingTxt2Img  # Easel's name for it


class StableDiffusionProcessingImg2Img(Txt2ImgRequest):
    """A1111's img2img request: the txt2img fields plus the init images, mask and inpainting options.

    `init_images`, `mask` and `latent_mask` are base64 in the API; the app process
    decodes them and sends the images to the backend beside the request.
    """

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int | str = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


Img2ImgRequest = StableDiffusionProcessingImg2Img  # Easel's name for it


class GeneratedImage(BaseModel):
    png: bytes
    infotext: str
    seed: int
    subseed: int
    prompt: str
    negative_prompt: str
    saved_path: str | None = None
    is_grid: bool = False


class GenerationResult(BaseModel):
    """What a generation job returns: images (grid first when there is one) and A1111's `info` fields."""

    images: list[GeneratedImage]
    info: dict[str, Any]
    warnings: list[str] = Field(default_factory=list)
    interrupted: bool = False
    # Images that always-on scripts add (PNG, e.g. preprocessor maps), shown after the generated images.
    extra_images: list[bytes] = Field(default_factory=list)
    # Checkpoints that failed to load while the default was chosen automatically ({path: reason}): the app passes
    # over them from then on (not part of the API's answer; the warnings name them).
    unloadable_checkpoints: dict[str, str] = Field(default_factory=dict)

