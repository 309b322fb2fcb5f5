"""The API's response models, named and shaped as AUTOMATIC1111's (`modules/api/models.py`), so that `/openapi.json`
names its schemas as A1111's does and SDKs generated from A1111's schema work with Easel.

The request models keep their A1111 names where they are defined (`backend.core.schemas`:
`StableDiffusionProcessingTxt2Img`, `StableDiffusionProcessingImg2Img`; `backend.postprocess.schemas`:
`ExtrasSingleImageRequest`, ...). Responses may carry more than A1111's fields (Easel's additions, e.g. the
progress's `current_task` or ControlNet's keys): every model keeps extra keys (`extra="allow"`), so a
`response_model` never drops what a route returns. Fields a route may leave empty are optional.
"""
from __future__ import annotations

import argparse
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model


class ApiResponse(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class TextToImageResponse(ApiResponse):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64 format.")
    parameters: dict
    info: str


class ImageToImageResponse(ApiResponse):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64 format.")
    parameters: dict
    info: str


class ExtrasSingleImageResponse(ApiResponse):
    html_info: str = Field(title="HTML info", description="A series of HTML tags containing the process info.")
    image: str | None = Field(default=None, title="Image", description="The generated image in base64 format.")


class ExtrasBatchImagesResponse(ApiResponse):
    html_info: str = Field(title="HTML info", description="A series of HTML tags containing the process info.")
    images: list[str] = Field(title="Images", description="The generated images in base64 format.")


class PNGInfoResponse(ApiResponse):
    info: str = Field(title="Image info", description="A string with the parameters used to generate the image")
    items: dict = Field(title="Items", description="A dictionary containing all the other fields the image had")
    parameters: dict = Field(title="Parameters", description="A dictionary with parsed generation info fields")


class ProgressResponse(ApiResponse):
    progress: float = Field(title="Progress", description="The progress with a range of 0 to 1")
    eta_relative: float = Field(title="ETA in secs")
    state: dict = Field(title="State", description="The current state snapshot")
    current_image: str | None = Field(default=None, title="Current image",
                                      description="The current image in base64 format.")
    textinfo: str | None = Field(default=None, title="Info text", description="Info text used by WebUI.")
    current_task: str | None = Field(default=None, title="Current task",
                                     description="The running job's task id (a request's force_task_id when given)")


class WorkerItem(ApiResponse):
    """One backend worker (Easel's own GET /sdapi/v1/workers)."""

    name: str = Field(title="Name", description="worker-1, worker-2, ... (ray-worker-N for Ray actors)")
    pid: int | None = Field(default=None, title="Process id", description="its process (None while it starts)")
    device: str | None = Field(default=None, title="Device", description="the device it owns, as its policy says")
    state: Literal["starting", "idle", "busy", "dead"] = Field(title="State")
    jobs_done: int = Field(title="Jobs done", description="jobs it answered (results and errors)")
    checkpoints: list[str] = Field(title="Checkpoints", description="paths of the checkpoints it has loaded, "
                                                                    "least recently used first")
    kind: Literal["local", "ray"] = Field(default="local", title="Kind",
                                          description="a spawned process on this machine, or a Ray actor")
    restarts: int = Field(default=0, title="Restarts", description="times it was restarted after dying")
    job: str | None = Field(default=None, title="Job", description="the id of the job it runs")
    node: str | None = Field(default=None, title="Node", description="a Ray actor's node IP address")


class SamplerItem(ApiResponse):
    name: str = Field(title="Name")
    aliases: list[str] = Field(title="Aliases")
    options: dict[str, Any] = Field(title="Options")


class SchedulerItem(ApiResponse):
    name: str = Field(title="Name")
    label: str = Field(title="Label")
    aliases: Optional[list[str]] = Field(default=None, title="Aliases")
    default_rho: Optional[float] = Field(default=None, title="Default Rho")
    need_inner_model: Optional[bool] = Field(default=None, title="Needs Inner Model")


class UpscalerItem(ApiResponse):
    name: str = Field(title="Name")
    model_name: Optional[str] = Field(default=None, title="Model Name")
    model_path: Optional[str] = Field(default=None, title="Path")
    model_url: Optional[str] = Field(default=None, title="URL")
    scale: Optional[float] = Field(default=None, title="Scale")


class LatentUpscalerModeItem(ApiResponse):
    name: str = Field(title="Name")


class SDModelItem(ApiResponse):
    title: str = Field(title="Title")
    model_name: str = Field(title="Model Name")
    hash: Optional[str] = Field(default=None, title="Short hash")
    sha256: Optional[str] = Field(default=None, title="sha256 hash")
    filename: str = Field(title="Filename")
    config: Optional[str] = Field(default=None, title="Config file")


class SDVaeItem(ApiResponse):
    model_name: str = Field(title="Model Name")
    filename: str = Field(title="Filename")


class SDModuleItem(ApiResponse):
    """Forge's `/sdapi/v1/sd-modules` item: a VAE or text encoder file of "VAE / Text Encoder"."""
    model_name: str = Field(title="Model Name")
    filename: str = Field(title="Filename")


class FaceRestorerItem(ApiResponse):
    name: str = Field(title="Name")
    cmd_dir: Optional[str] = Field(default=None, title="Path")


class RealesrganItem(ApiResponse):
    name: str = Field(title="Name")
    path: Optional[str] = Field(default=None, title="Path")
    scale: Optional[int] = Field(default=None, title="Scale")


class PromptStyleItem(ApiResponse):
    name: str = Field(title="Name")
    prompt: Optional[str] = Field(default=None, title="Prompt")
    negative_prompt: Optional[str] = Field(default=None, title="Negative Prompt")


class LoraItem(ApiResponse):
    """GET /sdapi/v1/loras (A1111's built-in Lora extension answers these keys, untyped)."""

    name: str = Field(title="Name")
    alias: Optional[str] = Field(default=None, title="Alias")
    path: Optional[str] = Field(default=None, title="Path")
    metadata: dict = Field(default_factory=dict, title="Metadata")


class HypernetworkItem(ApiResponse):
    name: str = Field(title="Name")
    path: Optional[str] = Field(default=None, title="Path")


class EmbeddingItem(ApiResponse):
    step: Optional[int] = Field(default=None, title="Step",
                                description="The number of steps that were used to train this embedding, if available")
    sd_checkpoint: Optional[str] = Field(default=None, title="SD Checkpoint",
                                         description="The hash of the checkpoint this embedding was trained on")
    sd_checkpoint_name: Optional[str] = Field(default=None, title="SD Checkpoint Name",
                                              description="The name of the checkpoint this embedding was trained on")
    shape: int = Field(title="Shape", description="The length of each individual vector in the embedding")
    vectors: int = Field(title="Vectors", description="The number of vectors in the embedding")


class EmbeddingsResponse(ApiResponse):
    loaded: dict[str, EmbeddingItem] = Field(title="Loaded", description="Embeddings loaded for the current model")
    skipped: dict[str, EmbeddingItem] = Field(title="Skipped",
                                              description="Embeddings skipped for the current model (another architecture)")


class MemoryResponse(ApiResponse):
    ram: dict = Field(title="RAM", description="System memory stats")
    cuda: dict = Field(title="CUDA", description="nVidia CUDA memory stats")


class ScriptsList(ApiResponse):
    txt2img: list | None = Field(default=None, title="Txt2img", description="Titles of scripts (txt2img)")
    img2img: list | None = Field(default=None, title="Img2img", description="Titles of scripts (img2img)")


class ScriptArg(ApiResponse):
    label: str | None = Field(default=None, title="Label", description="Name of the argument in UI")
    value: Optional[Any] = Field(default=None, title="Value", description="Default value of the argument")
    minimum: Optional[Any] = Field(default=None, title="Minimum", description="Minimum allowed value in the UI")
    maximum: Optional[Any] = Field(default=None, title="Maximum", description="Maximum allowed value in the UI")
    step: Optional[Any] = Field(default=None, title="Step", description="Step for changing the value in the UI")
    choices: Optional[list[Any]] = Field(default=None, title="Choices", description="Possible values for the argument")


class ScriptInfo(ApiResponse):
    name: str | None = Field(default=None, title="Name", description="Script name")
    is_alwayson: bool | None = Field(default=None, title="IsAlwayson",
                                     description="Flag specifying whether this script is an alwayson script")
    is_img2img: bool | None = Field(default=None, title="IsImg2img",
                                    description="Flag specifying whether this script is an img2img script")
    args: list[ScriptArg] = Field(title="Arguments", description="List of script's arguments")


class ExtensionItem(ApiResponse):
    name: str = Field(title="Name", description="Extension name")
    remote: Optional[str] = Field(default=None, title="Remote", description="Extension Repository URL")
    branch: Optional[str] = Field(default=None, title="Branch", description="Extension Repository Branch")
    commit_hash: Optional[str] = Field(default=None, title="Commit Hash", description="Extension Repository Commit Hash")
    version: Optional[str] = Field(default=None, title="Version", description="Extension Version")
    commit_date: Optional[Any] = Field(default=None, title="Commit Date", description="Extension Repository Commit Date")
    enabled: bool = Field(title="Enabled", description="Flag specifying whether this extension is enabled")


def _optional(value: Any) -> Any:
    """The JSON type a setting's or flag's default has, optional (None where the default says nothing)."""
    if isinstance(value, bool):
        return Optional[bool]
    if isinstance(value, (int, float)):
        return Optional[float] if isinstance(value, float) else Optional[int | float]
    if isinstance(value, str):
        return Optional[str]
    if isinstance(value, (list, tuple)):
        return Optional[list]
    if isinstance(value, dict):
        return Optional[dict]
    return Any


def options_model() -> type[BaseModel]:
    """A1111's `Options` schema (GET /sdapi/v1/options): one optional field per setting (`backend.core.options`
    SETTINGS), its default and label; other keys (stored unknown ones) pass through."""
    from backend.core.options import SETTINGS
    fields = {s.key: (_optional(s.default), Field(default=s.default, description=s.label)) for s in SETTINGS}
    return create_model("Options", __config__=ConfigDict(extra="allow", protected_namespaces=()), **fields)


def flags_model() -> type[BaseModel]:
    """A1111's `Flags` schema (GET /sdapi/v1/cmd-flags): one field per command-line flag, its default and help."""
    from backend.core.cmd_args import build_parser
    fields = {}
    for action in build_parser()._actions:
        if action.dest in ("help",) or action.dest in fields or action.default is argparse.SUPPRESS:
            continue
        fields[action.dest] = (_optional(action.default), Field(default=action.default, description=action.help))
    return create_model("Flags", __config__=ConfigDict(extra="allow", protected_namespaces=()), **fields)


OptionsModel = options_model()
FlagsModel = flags_model()
