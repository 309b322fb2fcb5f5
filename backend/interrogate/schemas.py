"""A1111's interrogate request and answer (`InterrogateRequest`, `InterrogateResponse` in its modules/api/models.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from backend.core.schemas import JsonRequest


class InterrogateRequest(JsonRequest):
    model_config = ConfigDict(extra="ignore")

    image: str | None = Field("", description="Image to work on, must be a Base64 string containing the image's data.")
    model: str = Field("clip", description="The interrogate model used: clip or deepdanbooru.")


class InterrogateResponse(BaseModel):
    caption: str | None = Field(None, description="The generated caption for the image.")
