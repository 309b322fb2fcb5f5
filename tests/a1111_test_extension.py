"""An AUTOMATIC1111-style test extension, written by test fixtures into a data dir's `extensions/` folder: script
files in the style of real extensions' (a selectable `Script` with `ui` and `run` calling `process_images`, an
`AlwaysVisible` one with `process` and `postprocess_image`, one whose file registers an `on_cfg_denoiser`
callback, one that raises in `run`) and a broken extension (a missing package, a name the layer lacks)."""
from __future__ import annotations

from pathlib import Path

STEPS_OVERRIDE = '''
import gradio as gr

import modules.scripts as scripts
from modules import shared
from modules.processing import Processed, process_images


class Script(scripts.Script):
    def title(self):
        return "Test steps override"

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        steps = gr.Slider(minimum=1, maximum=20, step=1, value=3, label="Override steps")
        shout = gr.Checkbox(False, label="Shout the prompt")
        return [steps, shout]

    def run(self, p, steps, shout):
        shared.state.job_count = 1
        assert not shared.state.interrupted
        p.steps = int(steps)
        if shout:
            p.prompt = p.prompt.upper()
        p.extra_generation_params["Test override"] = f"steps {int(steps)}"
        p.extra_generation_params["Test format"] = shared.opts.samples_format
        processed = process_images(p)
        return Processed(p, processed.images, processed.seed, processed.info, infotexts=processed.infotexts,
                         all_seeds=processed.all_seeds, index_of_first_image=processed.index_of_first_image)
'''

INVERT = '''
import gradio as gr
from PIL import ImageOps

import modules.scripts as scripts


class InvertScript(scripts.Script):
    def title(self):
        return "Test invert"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Checkbox(False, label="Invert the picture")]

    def process(self, p, enabled):
        if enabled:
            p.extra_generation_params["Test invert"] = True

    def postprocess_image(self, p, pp, enabled):
        if enabled:
            pp.image = ImageOps.invert(pp.image.convert("RGB"))
'''

CFG_CALLBACK = '''
import gradio as gr

import modules.scripts as scripts
from modules import script_callbacks


def silence_prompt(params):
    params.text_cond = params.text_cond * 0


script_callbacks.on_cfg_denoiser(silence_prompt)


class SilenceScript(scripts.Script):
    def title(self):
        return "Test silence"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Checkbox(True, label="Silence")]
'''

RAISER = '''
import gradio as gr

import modules.scripts as scripts


class Script(scripts.Script):
    def title(self):
        return "Test raiser"

    def ui(self, is_img2img):
        return [gr.Textbox("boom", label="Message")]

    def run(self, p, message):
        raise ValueError(f"the test script refuses: {message}")
'''

POSTPROCESS = '''
import modules.scripts as scripts


class AfterAll(scripts.Script):
    def title(self):
        return "Test after all"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def postprocess(self, p, processed, *args):
        processed.images.clear()
'''

MISSING_NAME = '''
import modules.scripts as scripts
from modules.shared import sd_model  # Easel's layer has no global model


class Script(scripts.Script):
    def title(self):
        return "Broken script"
'''

CALLBACK_ONLY = '''
from modules import script_callbacks

script_callbacks.on_cfg_denoiser(lambda params: None)
'''

MISSING_PACKAGE = '''
import no_such_package_for_easel_tests  # noqa: F401
'''

UI_TABS = '''
from modules import script_callbacks

script_callbacks.on_ui_tabs(lambda: [])
'''


def write_test_extensions(data_dir: Path) -> Path:
    root = Path(data_dir) / "extensions"
    files = {
        "easel-test-ext/scripts/steps_override.py": STEPS_OVERRIDE,
        "easel-test-ext/scripts/invert_always.py": INVERT,
        "easel-test-ext/scripts/cfg_callback.py": CFG_CALLBACK,
        "easel-test-ext/scripts/raiser.py": RAISER,
        "broken-ext/scripts/needs_missing.py": MISSING_NAME,
        "broken-ext/scripts/import_error.py": MISSING_PACKAGE,
        "broken-ext/scripts/ui_tabs.py": UI_TABS,
        "broken-ext/scripts/postprocess.py": POSTPROCESS,
        "broken-ext/scripts/callback_only.py": CALLBACK_ONLY,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip())
    return root
