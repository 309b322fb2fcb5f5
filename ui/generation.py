"""Controls and behaviour shared by the generation tabs (txt2img, img2img).

Each builder adds A1111's controls to a dict of components keyed by the
request field they edit; `results_column` lays out progress, preview, gallery,
infotext and the "Send to" buttons; `stream_job` runs a backend job from a
Gradio event with live progress; `reattach_on_load` lets a reloaded page pick
up the job it started (progress, preview, then the result), as A1111 does.
"""
from __future__ import annotations

import collections
import io
from typing import Callable

import anyio
import gradio as gr
from gradio.context import get_blocks_context
from PIL import Image

from backend.core import sampler_catalog
from backend.client import BackendError, Job
from backend.core.errors import UserError
from backend.service import EaselService

from backend.exposure import exposure_reasons
from ui.progress import info_html, progress_html, wait_with_updates, workers_html

NO_JOB: dict = {}  # the browser's job reference once the result is shown (Gradio does not store a None)

INT_FIELDS = ("steps", "width", "height", "batch_size", "n_iter", "seed", "subseed", "seed_resize_from_w",
              "seed_resize_from_h", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "mask_blur",
              "inpaint_full_res_padding")


def prompt_row(service: EaselService, tab: str, c: dict) -> dict:
    """Prompt, negative prompt, Generate / Interrupt / Skip, the extra-networks toggle, Styles."""
    from ui import styles
    buttons = {}
    with gr.Row(elem_id=f"{tab}_toprow"):
        with gr.Column(scale=6):
            c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{tab}_prompt",
                                     placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:when], [a|b], BREAK)")
            counters = {"prompt": token_counter(f"{tab}_token_counter")}
            c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}_neg_prompt")
            counters["negative_prompt"] = token_counter(f"{tab}_negative_token_counter")
        with gr.Column(scale=1, min_width=160):
            buttons["generate"] = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate")
            with gr.Row():  # there while a job of the tab runs (`busy`)
                buttons["interrupt"] = gr.Button("Interrupt", elem_id=f"{tab}_interrupt", size="sm", visible=False)
                buttons["skip"] = gr.Button("Skip", elem_id=f"{tab}_skip", size="sm", visible=False)
            buttons["status"] = gr.HTML(elem_id=f"{tab}_status", padding=False)  # a job's error, next to Generate
            with gr.Row(elem_classes=["easel-tool-row"]):  # A1111's row of tool buttons under Generate
                buttons["paste"] = gr.Button("Read params", size="sm", elem_id=f"{tab}_paste", min_width=60,
                                             elem_classes=["easel-tool"])
                buttons["clear_prompt"] = gr.Button("Clear", size="sm", elem_id=f"{tab}_clear_prompt", min_width=60,
                                                    elem_classes=["easel-tool"])
                # opens the cards panel below the prompts (ui/extra_networks.py), A1111's card button
                buttons["extra_networks"] = gr.Button("Networks", elem_id=f"{tab}_extra_networks", size="sm",
                                                      min_width=60, elem_classes=["easel-tool"])
            if tab == "img2img":  # A1111's Interrogate buttons beside Generate (wired in ui/interrogate.py)
                with gr.Row(elem_classes=["easel-tool-row"]):
                    buttons["interrogate"] = gr.Button("Interrogate CLIP", size="sm", elem_id="interrogate",
                                                       min_width=60, elem_classes=["easel-tool"])
                    buttons["deepbooru"] = gr.Button("Interrogate DeepBooru", size="sm", elem_id="deepbooru",
                                                     min_width=60, elem_classes=["easel-tool"])
            styles.build(service, tab, c)
            # set by a paste (PNG Info, Send to, Read parameters): settings this tab's next jobs use, as A1111's
            c["override_choices"] = gr.Dropdown([], value=[], multiselect=True, label="Override settings",
                                                visible=False, elem_id=f"{tab}_override_settings")
    for name, counter in counters.items():  # A1111's "12/75" of each prompt box, as the user types
        c[name].change(count_tokens, c[name], counter, queue=False, trigger_mode="always_last",
                       show_progress="hidden")
    return buttons


def token_counter(elem_id: str) -> gr.HTML:
    return gr.HTML(count_tokens(""), elem_id=elem_id, elem_classes=["easel-token-counter"], padding=False)


def count_tokens(text: str) -> str:
    """The CLIP tokens a prompt takes and the chunk length they fill (backend.core.token_counter)."""
    from backend.core.token_counter import prompt_tokens
    count, target = prompt_tokens(text or "")
    over = " easel-token-counter-long" if count > 75 else ""
    return f'<span class="easel-token-count{over}" title="tokens / length of the chunks of 75 they fill">{count}/{target}</span>'



def sampler_controls(service: EaselService, tab: str, c: dict) -> None:
    with gr.Row():
        c["sampler_name"] = gr.Dropdown([s.name for s in sampler_catalog.SAMPLERS], value=service.options["default_sampler"],
                                        label="Sampling method", elem_id=f"{tab}_sampling")
        c["scheduler"] = gr.Dropdown([s.label for s in sampler_catalog.SCHEDULERS], value="Automatic", label="Schedule type",
                                     elem_id=f"{tab}_scheduler")
    c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tab}_steps")


def distilled_cfg_slider(tab: str) -> gr.Slider:
    """Forge's "Distilled CFG Scale" beside CFG Scale: FLUX dev's guidance input (`distilled_cfg_scale`); models
    without one (SD, FLUX schnell, SD3) ignore it. FLUX runs with CFG Scale 1 (the negative prompt's pass skipped)."""
    return gr.Slider(0, 30, value=3.5, step=0.1, label="Distilled CFG Scale", elem_id=f"{tab}_distilled_cfg_scale",
                     info="FLUX dev's guidance; for FLUX set CFG Scale to 1")


def swap_size_button(tab: str, c: dict) -> gr.Button:
    """⇅: width and height swapped (call after both sliders exist)."""
    button = gr.Button("Swap width and height", size="sm", elem_id=f"{tab}_res_switch_btn", elem_classes=["easel-tool"])
    button.click(lambda w, h: (h, w), [c["width"], c["height"]], [c["width"], c["height"]], queue=False)
    return button


def batch_controls(tab: str, c: dict) -> None:
    c["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tab}_batch_count")
    c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}_batch_size")


def seed_controls(tab: str, c: dict) -> dict:
    buttons = {}
    with gr.Row():
        c["seed"] = gr.Number(-1, label="Seed", precision=0, elem_id=f"{tab}_seed")
        buttons["random_seed"] = gr.Button("\U0001f3b2", elem_id=f"{tab}_random_seed", size="sm", min_width=40)
        buttons["reuse_seed"] = gr.Button("\u267b\ufe0f", elem_id=f"{tab}_reuse_seed", size="sm", min_width=40)
    with gr.Accordion("Variation seed", open=False):
        with gr.Row():
            c["subseed"] = gr.Number(-1, label="Variation seed", precision=0, elem_id=f"{tab}_subseed")
            c["subseed_strength"] = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength")
        with gr.Row():
            c["seed_resize_from_w"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width")
            c["seed_resize_from_h"] = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height")
    return buttons


def extra_controls(service: EaselService, tab: str, c: dict) -> None:
    with gr.Row():
        c["tiling"] = gr.Checkbox(False, label="Tiling", elem_id=f"{tab}_tiling")
        c["clip_skip"] = gr.Slider(1, 12, value=service.options["CLIP_stop_at_last_layers"], step=1, label="Clip skip",
                                   elem_id=f"{tab}_clip_skip")


def results_column(service: EaselService, tab: str) -> dict:
    """Progress, the gallery (the live preview takes its place while a job samples), Save / Zip / Open folder,
    the Send to buttons and the infotext."""
    r: dict = {}
    r["progress"] = gr.HTML(elem_id=f"{tab}_progress")
    r["preview"] = gr.Image(label="Live preview", interactive=False, height=512, visible=False,
                            elem_id=f"{tab}_preview")
    r["gallery"] = gr.Gallery(label="Output", columns=4, height=512, elem_id=f"{tab}_gallery", format="png",
                              object_fit="contain")
    with gr.Row():
        r["save"] = gr.Button("Save", size="sm", elem_id=f"save_{tab}", elem_classes=["easel-tool"])
        r["zip"] = gr.Button("Zip", size="sm", elem_id=f"save_zip_{tab}", elem_classes=["easel-tool"])
        # opens the output folder on the server's screen: only where the browser is on that machine
        r["open_folder"] = gr.Button("Open folder", size="sm", elem_id=f"open_folder_{tab}",
                                     visible=folder_opening_allowed(service),
                                     elem_classes=["easel-tool"])
    r["download"] = gr.File(label="Saved files", file_count="multiple", interactive=False, visible=False,
                            elem_id=f"download_files_{tab}")
    with gr.Row():
        r["send_img2img"] = gr.Button("Send to img2img", size="sm", elem_id=f"{tab}_send_to_img2img")
        r["send_inpaint"] = gr.Button("Send to inpaint", size="sm", elem_id=f"{tab}_send_to_inpaint")
        r["send_extras"] = gr.Button("Send to extras", size="sm", elem_id=f"{tab}_send_to_extras")
    r["info"] = gr.HTML(elem_id=f"{tab}_info")
    r["workers"] = gr.HTML(elem_id=f"{tab}_workers")  # the backend workers while a job waits or runs (several only)
    r["last_seed"] = gr.State(-1)
    r["infotexts"] = gr.State([])
    r["images"] = gr.State([])  # the PIL images shown, for Send to
    r["selected"] = gr.State(0)
    # {"job_id", "key"} of the tab's job until its result is shown, kept in the browser (localStorage) for a reload
    r["job_ref"] = gr.BrowserState(None, storage_key=f"easel_{tab}_job")
    r["outdir_key"] = f"outdir_{tab}_samples"  # the folder Open folder opens
    return r


# What a generation event updates, by name (`result_outputs`), and how a step of it is written (`frame`).
RESULT_PARTS = ("gallery", "progress", "preview", "info", "last_seed", "infotexts", "images", "job_ref",
                "generate", "interrupt", "skip", "status", "workers")


def result_outputs(r: dict) -> list:
    """The components a generation event updates, in the order of `RESULT_PARTS` (what `frame` yields)."""
    return [r[name] for name in RESULT_PARTS]


def frame(**parts) -> tuple:
    """One update of a generation event: the named parts changed, the rest kept."""
    unknown = set(parts) - set(RESULT_PARTS)
    if unknown:
        raise ValueError(f"not a result part: {sorted(unknown)}")
    return tuple(parts.get(name, gr.update()) for name in RESULT_PARTS)


def busy(label: str) -> dict:
    """Generate shows the job's state; Interrupt and Skip are there while it lasts."""
    return {"generate": gr.update(value=label), "interrupt": gr.update(visible=True), "skip": gr.update(visible=True)}


def idle() -> dict:
    """The tab at rest: Generate, no Interrupt/Skip, the gallery back in the preview's place. (New updates each
    time: Gradio consumes the update dicts it is given, so a shared one would be empty the second time.)"""
    return {"generate": gr.update(value="Generate"), "interrupt": gr.update(visible=False),
            "skip": gr.update(visible=False), "preview": gr.update(value=None, visible=False),
            "gallery": gr.update(visible=True), "progress": ""}


def workers_line(client) -> str:
    """The workers' table while a job waits or runs, when there are several (one worker: nothing to show)."""
    workers = client.workers_state()
    return workers_html(workers) if len(workers) > 1 else ""


def busy_label(job: Job, client) -> str:
    if job.status == "queued":
        ahead = client.position(job)
        return f"Queued ({ahead} ahead)" if ahead else "Queued"
    if job.total:
        return f"Running {int(job.progress * 100)}%"
    return "Running"


def error_parts(message: str) -> dict:
    """An error next to Generate (and in the info area, and as a toast), the tab idle again."""
    gr.Warning(message)
    return {**idle(), "info": info_html(message, error=True), "status": info_html(message, error=True)}


def error_frame(message: str, **more) -> tuple:
    return frame(**{**error_parts(message), **more})


def overrides_from(checkpoint: str | None, vae_choice: str | None, clip_skip) -> dict:
    overrides = {"CLIP_stop_at_last_layers": int(clip_skip)}
    if checkpoint:
        overrides["sd_model_checkpoint"] = checkpoint
    if vae_choice:
        overrides["sd_vae"] = vae_choice
    return overrides


def clean_fields(fields: dict) -> dict:
    """Gradio numbers arrive as floats (or None): make the integer fields ints, the schedule non-empty."""
    for key in INT_FIELDS:
        if key in fields:
            fields[key] = int(fields[key] if fields[key] is not None else -1)
    if "scheduler" in fields:
        fields["scheduler"] = fields["scheduler"] or "Automatic"
    return fields


async def stream_job(service: EaselService, start: Callable[[], Job]):
    """Start a job (`start` runs on a worker thread) and follow it, yielding `frame`s for `result_outputs`.

    The job's reference is stored in the browser first, so that a page reloaded meanwhile reattaches to it.
    """
    try:
        job = await anyio.to_thread.run_sync(start)
    except (UserError, BackendError) as exc:
        yield error_frame(exc.message)
        return
    yield frame(progress=progress_html(job, service.client.position(job)), status="",
                job_ref={"job_id": job.job_id, "key": job.watch_key}, **busy(busy_label(job, service.client)))
    async for update in follow_job(service, job):
        yield update


async def reattach(service: EaselService, job_ref, still_wanted: Callable[[], bool] = lambda: True):
    """On page load: follow the job this browser started in the tab, if the page has not shown its result yet
    (and as long as `still_wanted()`)."""
    job = None
    if isinstance(job_ref, dict):
        job = service.client.find_job(job_ref.get("job_id", ""), job_ref.get("key", ""))
    if job is None:  # nothing to show; a reference to a job no longer kept is dropped
        yield frame(**({"job_ref": NO_JOB} if job_ref else {}))
        return
    async for update in follow_job(service, job, still_wanted):
        yield update


async def follow_job(service: EaselService, job: Job, still_wanted: Callable[[], bool] = lambda: True):
    """Progress and live preview while `job` waits or runs, then its images and infotext, or its error.

    The live preview takes the gallery's place while there is one. Awaits without holding a thread; stops, showing
    nothing more, once `still_wanted()` is false. The last frame clears the browser's job reference: the page shows
    the result.
    """
    async for progress, img in wait_with_updates(job, service.client):
        if not still_wanted():
            return
        parts = {"progress": progress, "workers": workers_line(service.client), **busy(busy_label(job, service.client))}
        if img is not None:
            parts.update(preview=gr.update(value=img, visible=True), gallery=gr.update(visible=False))
        yield frame(**parts)
    if not still_wanted():
        return
    if job.error is not None:
        yield error_frame(getattr(job.error, "message", str(job.error)), job_ref=NO_JOB)
        return
    result = job.result
    pictures = [Image.open(io.BytesIO(img.png)) for img in result.images]
    texts = [img.infotext for img in result.images]
    first = next((img for img in result.images if not img.is_grid), None)
    notes = "\n".join(result.warnings + (["Interrupted."] if result.interrupted else []))
    # the first picture's infotext, a grid's included, as A1111's info (infotexts[0]; an X/Y/Z grid's names its axes)
    shown = (texts[0] if texts else "") + (f"\n{notes}" if notes else "")
    maps = [Image.open(io.BytesIO(png)) for png in getattr(result, "extra_images", [])]  # always-on scripts' images, last
    yield frame(**{**idle(), "status": "", "info": info_html(shown), "last_seed": (first.seed if first else -1),
                   "infotexts": texts + [""] * len(maps), "images": pictures, "job_ref": NO_JOB,
                   "gallery": gr.update(value=[(p, None) for p in pictures + maps], visible=True)})


def wire_results(service: EaselService, r: dict, buttons: dict, c: dict, run: Callable, inputs: list) -> None:
    """Generate (button and Enter in the prompt), Interrupt, Skip, the seed buttons, gallery selection, Save, Zip,
    Open folder."""
    r.update(generate=buttons["generate"], interrupt=buttons["interrupt"], skip=buttons["skip"],
             status=buttons["status"])
    outputs = result_outputs(r)
    presses = GeneratePresses()

    async def generate(request: gr.Request, *values):
        presses.count(request.session_hash)
        async for update in run(*values):
            yield update

    buttons["generate"].click(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)
    c["prompt"].submit(generate, inputs=inputs, outputs=outputs, concurrency_limit=None)
    reattach_on_load(service, r, presses)
    # the tab's own job, on the worker that runs it (the page's job reference; none: every running job)
    buttons["interrupt"].click(lambda ref: service.interrupt(ref), inputs=[r["job_ref"]], queue=False)
    buttons["skip"].click(lambda ref: service.skip(ref), inputs=[r["job_ref"]], queue=False)
    buttons["clear_prompt"].click(lambda: ("", ""), outputs=[c["prompt"], c["negative_prompt"]], queue=False)
    buttons["random_seed"].click(lambda: -1, outputs=[c["seed"]], queue=False)
    buttons["reuse_seed"].click(lambda s: s, inputs=[r["last_seed"]], outputs=[c["seed"]], queue=False)

    def on_select(texts: list, evt: gr.SelectData):
        if texts and 0 <= evt.index < len(texts):
            return info_html(texts[evt.index]), evt.index
        return gr.update(), 0

    r["gallery"].select(on_select, inputs=[r["infotexts"]], outputs=[r["info"], r["selected"]], queue=False)
    wire_saving(service, r)


def wire_saving(service: EaselService, r: dict) -> None:
    """Save (the selected picture, or all: setting save_selected_only) and Zip into the save folder, offered for
    download; Open folder: the tab's output folder in the server's file manager."""
    from backend.saved_images import save_pictures, zip_pictures

    def done(paths: list, what: str):
        names = ", ".join(p.name for p in paths)
        return gr.update(value=[str(p) for p in paths], visible=True), info_html(f"{what}: {names}")

    def on_save(images, texts, selected):
        try:
            return done(save_pictures(service.paths, service.options, images or [], texts or [], selected), "Saved")
        except (UserError, OSError) as exc:
            message = exc.message if isinstance(exc, UserError) else f"Could not save: {exc}"
            gr.Warning(message)
            return gr.update(), info_html(message, error=True)

    def on_zip(images, texts):
        try:
            return done([zip_pictures(service.paths, service.options, images or [], texts or [])], "Zipped")
        except (UserError, OSError) as exc:
            message = exc.message if isinstance(exc, UserError) else f"Could not zip: {exc}"
            gr.Warning(message)
            return gr.update(), info_html(message, error=True)

    r["save"].click(on_save, [r["images"], r["infotexts"], r["selected"]], [r["download"], r["status"]])
    r["zip"].click(on_zip, [r["images"], r["infotexts"]], [r["download"], r["status"]])
    key = r.get("outdir_key")
    if key:
        r["open_folder"].click(lambda: open_folder(service, key), None, None, queue=False)


def folder_opening_allowed(service: EaselService) -> bool:
    """Open folder acts on the server's screen: only when no one else can reach the server and folders are shown."""
    return not exposure_reasons(service.args) and not service.args.hide_ui_dir_config


def open_folder(service: EaselService, key: str) -> None:
    """The folder of setting `key` (an output folder) in the file manager of the machine the server runs on."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not folder_opening_allowed(service):
        raise gr.Error("Open folder works only when the browser is on the server's machine.")
    target = Path(service.options[key])
    folder = target if target.is_absolute() else service.paths.data_dir / target
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":
        os.startfile(folder)  # noqa: S606 (a folder of our own settings)
        return
    opener = "open" if sys.platform == "darwin" else shutil.which("xdg-open")
    if not opener:
        gr.Warning(f"No file manager to open {folder} with (install xdg-utils); the folder is {folder}.")
        return
    subprocess.Popen([opener, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class GeneratePresses:
    """How many times each page (Gradio session) pressed Generate in a tab, for the most recent pages."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self._counts: collections.OrderedDict[str | None, int] = collections.OrderedDict()

    def count(self, session: str | None) -> None:
        self._counts[session] = self._counts.pop(session, 0) + 1
        while len(self._counts) > self.keep:
            self._counts.popitem(last=False)

    def of(self, session: str | None) -> int:
        return self._counts.get(session, 0)


def reattach_on_load(service: EaselService, r: dict, presses: GeneratePresses) -> None:
    """When the page loads, show the job the tab started before a reload (see `reattach`).

    A Generate pressed meanwhile in the page stops it, so that the two never update the results (and the job
    reference) in turn.
    """
    async def on_load(request: gr.Request, job_ref):
        session = request.session_hash
        pressed = presses.of(session)
        async for update in reattach(service, job_ref, still_wanted=lambda: presses.of(session) == pressed):
            yield update

    demo = get_blocks_context().root_block  # the Blocks being built, whose load event this is
    demo.load(on_load, inputs=[r["job_ref"]], outputs=result_outputs(r), concurrency_limit=None,
              show_progress="hidden")  # no spinners over the results while a page only looks for its job


def selected_image(images: list, selected: int) -> Image.Image | None:
    """The image a Send to button sends: the selected one, else the first that is not the grid."""
    if not images:
        return None
    if 0 <= selected < len(images):
        return images[selected]
    return images[0]
