"""An AUTOMATIC1111-style test extension, written by test fixtures into a data dir's `extensions/` folder: script
files in the style of real extensions' (a selectable `Script` with `ui` and `run` calling `process_images`, an
`AlwaysVisible` one with `process` and `postprocess_image`, one with every per-batch and end-of-job method, one
rewriting the request on `p`, one whose file registers an `on_cfg_denoiser`
callback and a setting, one that raises in `run`), an extension using every script callback (`CALLBACKS`) and a
broken extension (a missing package, a name the layer lacks, a tab callback that raises)."""
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
from modules import script_callbacks, shared


def add_settings():
    shared.opts.add_option("easel_test_silence", shared.OptionInfo(False, "Silence the prompt (test extension)",
                                                                   gr.Checkbox, section=("easel_test", "Easel test")))


def silence_prompt(params):  # runs in every job, as A1111's: the setting decides
    if shared.opts.easel_test_silence:
        params.text_cond = params.text_cond * 0


script_callbacks.on_ui_settings(add_settings)
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

# Every per-batch and end-of-job method of an AlwaysVisible script, as AUTOMATIC1111 1.10 calls them.
BATCH_HOOKS = '''
import gradio as gr
from PIL import Image

import modules.scripts as scripts


class BatchHooks(scripts.Script):
    def title(self):
        return "Test batch hooks"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Checkbox(False, label="Enabled")]

    def setup(self, p, enabled):
        self.calls = ["setup"]

    def before_process(self, p, enabled):
        self.calls.append("before_process")

    def process(self, p, enabled):
        self.calls.append("process")

    def before_process_batch(self, p, enabled, batch_number, prompts, seeds, subseeds):
        self.calls.append(f"before_process_batch {batch_number} {len(prompts)} {seeds[0] - p.all_seeds[0]}")
        if enabled:
            for i in range(len(prompts)):
                prompts[i] = f"{prompts[i]} in batch {batch_number}"

    def process_batch(self, p, enabled, **kwargs):
        self.calls.append(f"process_batch {kwargs['batch_number']} {kwargs['prompts'][0]}")

    def postprocess_batch(self, p, enabled, images, batch_number):
        self.calls.append(f"postprocess_batch {batch_number} {tuple(images.shape)} {float(images.max()) <= 1.0}")
        if enabled:
            images[:, 0] = 0  # no red in the saved pictures

    def postprocess_batch_list(self, p, pp, enabled, batch_number):
        self.calls.append(f"postprocess_batch_list {batch_number} {len(pp.images)}")

    def postprocess(self, p, processed, enabled):
        self.calls.append(f"postprocess {len(processed.images)}")
        p.extra_generation_params["Test calls"] = "; ".join(self.calls)
        if enabled:
            processed.images.append(Image.new("RGB", (8, 8), (1, 2, 3)))
            processed.infotexts.append("; ".join(self.calls))
'''

# Dynamic-Prompts-style changes to the request on p in process() (and a value the edge refuses).
PROMPT_REWRITE = '''
import gradio as gr

import modules.scripts as scripts


class PromptRewrite(scripts.Script):
    def title(self):
        return "Test prompt rewrite"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Dropdown(["off", "all prompts", "fields", "bad steps", "bad sampler"], value="off",
                            label="Mode")]

    def before_process(self, p, mode):
        if mode == "fields":
            p.prompt = "a green field"

    def process(self, p, mode):
        if mode == "all prompts":
            p.all_prompts = [f"{prompt} variant {i}" for i, prompt in enumerate(p.all_prompts)]
            p.all_seeds = [1000 + i for i in range(len(p.all_seeds))]
        elif mode == "fields":
            p.steps, p.cfg_scale, p.sampler_name = 3, 5, "Euler a"
        elif mode == "bad steps":
            p.steps = 0
        elif mode == "bad sampler":
            p.sampler_name = "No such sampler"
'''

# The compatibility names scripts commonly use: modules.ui_components in ui(), modules.sd_models in the app and in
# a job, shared.sd_model / p.sd_model, modules.devices, shared.state.interrupt().
COMPAT_NAMES = '''
import gradio as gr

import modules.scripts as scripts
from modules import devices, sd_models, shared
from modules.ui_components import FormRow, InputAccordion, ToolButton


class CompatNames(scripts.Script):
    def title(self):
        return "Test compat names"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Compat names") as enabled:
            with FormRow():
                checkpoint = gr.Dropdown(sd_models.checkpoint_tiles(), value=sd_models.select_checkpoint().title,
                                         label="Checkpoint")
                ToolButton("R")
            stop = gr.Checkbox(False, label="Interrupt after the first batch")
        return [enabled, checkpoint, stop]

    def process(self, p, enabled, checkpoint, stop):
        if not enabled:
            return
        model = shared.sd_model
        assert p.sd_model.sd_checkpoint_info.title == model.sd_checkpoint_info.title
        p.extra_generation_params["Test compat"] = "|".join(str(x) for x in (
            model.sd_checkpoint_info.title, model.is_sd1, model.is_sdxl, devices.device, devices.dtype,
            sd_models.select_checkpoint().filename == model.sd_checkpoint_info.filename))

    def postprocess_batch(self, p, enabled, checkpoint, stop, images, batch_number):
        if enabled and stop and batch_number == 0:
            assert not shared.state.interrupted
            shared.state.interrupt()
            assert shared.state.interrupted
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


def broken_tab():
    raise RuntimeError("the test tab is broken")


script_callbacks.on_ui_tabs(broken_tab)
'''

# Every app and backend callback, in the style of real extensions; what the backend's callbacks saw is written
# beside the extension (saved.txt, models.txt).
CALLBACKS = '''
from pathlib import Path

import gradio as gr

from modules import script_callbacks, shared

HERE = Path(__file__).resolve().parent.parent


def on_ui_settings():
    section = ("easel_callbacks", "Easel callbacks test")
    shared.opts.add_option("easel_test_level", shared.OptionInfo(
        3, "Test level", gr.Slider, {"minimum": 0, "maximum": 10, "step": 1}, section=section))
    shared.opts.add_option("easel_test_tag", shared.OptionInfo(
        "Tagged by the test extension", "Infotext tag", gr.Textbox, section=section))


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Hello from the callbacks test tab", elem_id="easel_callbacks_tab_text")
    return [(tab, "Callbacks test", "easel_callbacks_tab")]


def on_app_started(demo, app):
    @app.get("/easel-callbacks-test/ping")
    def ping():
        return {"pong": True, "with_ui": demo is not None, "level": shared.opts.easel_test_level}


def on_before_image_saved(params):
    if params.p is not None and "[tag]" in params.p.prompt:
        params.pnginfo["parameters"] += f", Test tag: {shared.opts.easel_test_tag} level {shared.opts.easel_test_level}"


def on_image_saved(params):
    with open(HERE / "saved.txt", "a", encoding="utf-8") as f:
        f.write(params.filename + "\\n")


def raises(*args):
    raise ValueError("this callback always fails")


def on_model_loaded(sd_model):
    info = sd_model.sd_checkpoint_info
    with open(HERE / "models.txt", "a", encoding="utf-8") as f:
        f.write(f"{info.title}|{info.filename}\\n")


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_before_image_saved(raises)
script_callbacks.on_before_image_saved(on_before_image_saved)
script_callbacks.on_image_saved(on_image_saved)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_cfg_denoiser(raises)
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
        "easel-test-ext/scripts/batch_hooks.py": BATCH_HOOKS,
        "easel-test-ext/scripts/prompt_rewrite.py": PROMPT_REWRITE,
        "easel-test-ext/scripts/compat_names.py": COMPAT_NAMES,
        "broken-ext/scripts/callback_only.py": CALLBACK_ONLY,
        "easel-callbacks-ext/scripts/callbacks.py": CALLBACKS,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip())
    return root
