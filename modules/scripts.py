"""AUTOMATIC1111's `modules.scripts`: the `Script` base class an extension's script subclasses, `AlwaysVisible`,
`PostprocessImageArgs`, `basedir()`.

How Easel runs a `Script` (see `modules.script_loading` and docs/a1111_scripts.md):
- app process: `title()`, `show(is_img2img)` and `ui(is_img2img)` make the Script dropdown's entry (or, for an
  `AlwaysVisible` script, an `alwayson_scripts` entry) and its `script_args`, in the order `ui` returns them;
- backend process: `run(p, *args)` for the selected script (its `process_images(p)` runs the ordinary pipeline
  in the job); `AlwaysVisible` scripts' `setup`, `before_process`, `process`, `before_process_batch`,
  `process_batch`, `postprocess_batch`, `postprocess_batch_list`, `postprocess_image` and `postprocess` where
  AUTOMATIC1111 1.10 calls them (`backend/engine/a1111_always_on.py`).
"""
from __future__ import annotations

from modules.context import missing

__all__ = ["Script", "AlwaysVisible", "PostprocessImageArgs", "PostprocessBatchListArgs", "basedir"]

AlwaysVisible = object()  # show() returns it: the script always runs, its controls in their own accordion


class PostprocessImageArgs:
    """`postprocess_image(p, pp, *args)`: `pp.image` is the picture; a script may replace it."""

    def __init__(self, image):
        self.image = image


class PostprocessBatchListArgs:
    """`postprocess_batch_list(p, pp, *args, batch_number=)`: `pp.images` is the batch's pictures as a list of
    (C, H, W) tensors in 0..1; a script may change or replace them (not their number)."""

    def __init__(self, images):
        self.images = images


class Script:
    filename: str | None = None
    args_from: int | None = None
    args_to: int | None = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    group = None
    infotext_fields = None
    paste_field_names = None
    api_info = None

    def title(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no title()")

    def ui(self, is_img2img):
        """The script's Gradio controls (a list); their values are `run`'s positional arguments."""
        return None

    def show(self, is_img2img):
        """True / False: listed in the tab's Script dropdown or not; `AlwaysVisible`: always runs."""
        return True

    def run(self, p, *args):
        raise NotImplementedError(f"script {self.title()!r} has no run()")

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def describe(self) -> str:
        return ""

    def elem_id(self, item_id: str) -> str:
        tab = "img2img" if self.is_img2img else "txt2img"
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{tab}_{title}_{item_id}"


def basedir() -> str:
    """The folder of the extension whose script is being loaded (A1111's `scripts.basedir()`)."""
    from modules.script_loading import loading_basedir
    return loading_basedir()


def __getattr__(name: str):
    raise missing(__name__, name)
