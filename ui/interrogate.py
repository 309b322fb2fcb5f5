"""img2img's Interrogate CLIP and Interrogate DeepBooru buttons: a caption of the current sub-tab's picture (BLIP +
CLIP's category matches, or DeepDanbooru's tags) into the prompt, as in A1111.

The picture is the one the Generate button would use (the img2img image, a sketch or inpaint editor's
background, Inpaint upload's image); the backend's "interrogate" job makes the caption
(`backend.interrogate.service`). A missing picture or model file is shown next to Generate and as a toast.
"""
from __future__ import annotations

import gradio as gr
from PIL import Image

from backend.client import BackendError
from backend.core import image_prep
from backend.core.errors import UserError
from backend.service import EaselService
from ui.progress import info_html

PICTURE_TABS = ("img2img", "sketch", "inpaint", "inpaint_sketch", "inpaint_upload")


def picture_of(mode: str, pictures: list) -> Image.Image:
    """The picture of sub-tab `mode` (`pictures`: the image inputs in PICTURE_TABS order); `UserError` when none."""
    picture = dict(zip(PICTURE_TABS, pictures)).get(mode)
    if isinstance(picture, dict):  # an editor: its background picture
        picture = picture.get("background")
    if picture is None:
        raise UserError("Interrogate: upload a picture in this img2img sub-tab first.")
    return image_prep.flatten(picture)


def wire(service: EaselService, button: gr.Button, model: str, mode: gr.State, image_inputs: list,
         prompt: gr.Textbox, status: gr.HTML) -> None:
    """`button` puts the caption of `model` ("clip" or "deepdanbooru") for the current picture into `prompt`."""

    async def interrogate(mode_name, *pictures):
        try:
            job = service.interrogate.submit_interrogate(picture_of(mode_name, list(pictures)), model)
            result = await job.outcome()
        except (UserError, BackendError) as exc:
            gr.Warning(exc.message)
            return gr.update(), info_html(exc.message, error=True)
        return result["caption"], ""

    button.click(interrogate, [mode] + list(image_inputs), [prompt, status], show_progress="minimal")
