"""The app process's single entry point to Easel's features, shared by the UI and the API.

It holds the settings, the model registry and the backend client, turns typed
requests into backend jobs (resolving the checkpoint, VAE and settings for the
job), and answers the questions that need no device (model lists, PNG info).
Importable without Gradio.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from PIL import Image

from backend.core import infotext, limits, request_checks, sampler_catalog
from backend.checkpoints import HashCache, ModelFile, ModelRegistry
from backend.client import BackendClient, Job
from backend.core.errors import UserError
from backend.core.ignored_inputs import request_warnings
from backend.request_infotext import apply_infotext
from backend.core.image_codec import open_image_bytes  # noqa: F401  (also re-exported for callers)
from backend.core.options import Options
from backend.core.paths import DataPaths
from backend.core.schemas import GenerationResult, Img2ImgRequest, Txt2ImgRequest
from backend.core.unet_layout import MISSING_PARTS_STATUS

log = logging.getLogger("easel")

DEFAULT_MODEL_URL = "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"
DEFAULT_MODEL_NAME = "v1-5-pruned-emaonly.safetensors"
MODEL_SETTINGS = ("sd_model_checkpoint", "sd_vae")  # settings whose change loads a model at once
REPORTED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")  # what api_options reports of the model in use


class EaselService:
    def __init__(self, args):
        self.args = args
        self.paths = DataPaths.from_args(args)
        self.paths.ensure_folders()
        self.options = Options(self.paths.config_file, self.paths.data_dir, frozen=args.freeze_settings,
                               hide_dir_config=args.hide_ui_dir_config)
        self.hashes = HashCache(self.paths.cache_dir / "hashes.json")
        from backend.core.styles import StyleDatabase
        # prompt styles (styles.csv; the Styles dropdown, /sdapi/v1/prompt-styles, a request's `styles`)
        self.styles = StyleDatabase(self.paths.styles_files)
        for problem in self.styles.errors:
            log.warning(problem)
        self.registry = ModelRegistry(self.paths.ckpt_dirs, self.paths.vae_dirs, self.hashes)
        self.options.add_value_check("sd_model_checkpoint", self._checkpoint_title)
        self.options.add_value_check("sd_vae", self._vae_choice)
        from backend.model_parts import ModelParts
        # "VAE / Text Encoder" (Forge's): the files that complete a FLUX.1 / SD3 checkpoint (/sdapi/v1/sd-modules)
        self.parts = ModelParts(self.paths.vae_dirs + self.paths.text_encoder_dirs)
        self.options.add_value_check("forge_additional_modules", self.parts.resolve)
        if args.ckpt:
            self._select_initial_checkpoint(args.ckpt)
        from backend.core.cmd_args import backend_workers
        self.client = BackendClient({k: v for k, v in vars(args).items() if k != "unknown"},
                                    queue_limit=lambda: self.options["queue_max_jobs"], workers=backend_workers(args))
        self.client.finished_hooks.append(self._note_unloadable_checkpoints)
        from backend.always_on_scripts import AlwaysOnScripts
        from backend.core.native_extensions import load_registry
        from backend.extensions import all_extensions, enabled_extensions
        # the enabled extensions' easel_extension.py (docs/extensions.md; the built-in ones in extensions-builtin/):
        # their components (made once here), always-on scripts, job kinds, API routers and UI parts
        running = enabled_extensions(self.paths, self.options, args)
        self.native_extensions = load_registry(running)
        self._extensions_off = [e.name for e in all_extensions(self.paths.data_dir, self.options, with_git=False)
                                if e.name not in {r.name for r in running}]  # named in the 422 of their scripts
        for setting in self.native_extensions.settings:  # through the one settings gate, like Easel's own
            self.options.register(setting)
        self.components = {key: make(self) for key, make in self.native_extensions.components.items()}
        from backend.core.scripts_catalog import SCRIPTS, ScriptCatalog, xyz_plot_specs
        # the Script dropdown's scripts (script_name + script_args; /sdapi/v1/scripts, /sdapi/v1/script-info)
        self.selectable_scripts = ScriptCatalog(SCRIPTS)
        # the X/Y/Z plot's axes the enabled extensions add (ControlNet's "[ControlNet] Weight", ...), after A1111's
        self.xyz_extra_axes = [axis for build in self.native_extensions.xyz_axes for axis in build(self)]
        for spec in xyz_plot_specs(self._xyz_catalogs, lambda: int(self.options["max_images_per_job"]),
                                   self.xyz_extra_axes):
            self.selectable_scripts.add(spec)
        from backend.a1111_scripts import ExtensionScripts
        # AUTOMATIC1111 scripts of the enabled extensions (extensions/*/scripts, through modules/): selectable ones
        # join the Script dropdown, AlwaysVisible ones the always-on scripts; a file that fails to load is logged
        # and skipped
        script_files = [(f, e.path) for e in running for f in e.script_files]
        self.extension_scripts = ExtensionScripts(
            script_files, self.options.as_dict(), args,
            taken={s.name for s in self.selectable_scripts.scripts} | set(self.native_extensions.alwayson_tabs()),
            models=self.registry)  # modules.sd_models: the checkpoints on disk
        # their on_ui_settings callbacks: the options they add join the settings table before any is used
        self.extension_scripts.register_settings(self.options)
        self.extension_scripts.set_app_default_context(self.options)
        for spec in self.extension_scripts.selectable_specs():
            self.selectable_scripts.add(spec)
        for spec in (s for tab in ("txt2img", "img2img") for s in self.extension_scripts.always_on_specs(tab)):
            self.selectable_scripts.add_always_on(spec)
        # alwayson_scripts whose arguments are checked here and prepared into sampling hooks in the backend
        self.scripts = AlwaysOnScripts([d.app(self) for d in self.native_extensions.always_on]
                                       + self.extension_scripts.always_on())
        from backend.networks.catalog import ExtraNetworksCatalog
        # LoRA and embedding files (LoRA / Textual Inversion tabs, /sdapi/v1/loras, /sdapi/v1/embeddings)
        self.networks = ExtraNetworksCatalog(self.paths)
        from backend.postprocess.service import PostprocessService
        # upscalers and face restorers (lists, hires. fix names), Extras jobs
        self.postprocess = PostprocessService(args, self.paths, self.options, self.client, self._batch_folder)
        from backend.interrogate.service import InterrogateService
        # a caption for a picture (img2img's Interrogate buttons, /sdapi/v1/interrogate)
        self.interrogate = InterrogateService(self.paths, self.options, self.client)
        from backend.extensions import ExtensionManager
        # the folders in extensions/ (Extensions tab, /sdapi/v1/extensions, the page's extension scripts and styles)
        self.extensions = ExtensionManager(args, self.paths, self.options)

    def __getattr__(self, name: str):
        """An extension's component is also the service's attribute of its key (`service.controlnet`)."""
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _select_initial_checkpoint(self, ckpt: str) -> None:
        path = Path(ckpt).expanduser()
        if path.is_file():
            folder = path.resolve().parent
            if folder not in [d.resolve() for d in self.registry.ckpt_dirs]:
                self.registry.ckpt_dirs.append(folder)
                self.registry.refresh()
            ckpt = str(path.resolve())
        try:
            found = self.registry.find_checkpoint(ckpt)
            self.options.update({"sd_model_checkpoint": found.title}, from_flags=True)
        except UserError as exc:
            log.warning("--ckpt: %s", exc.message)

    def start(self, wait: bool = True) -> None:
        # the selected checkpoint's sha256, as A1111 computes it when it loads the model at start: its title in
        # /sdapi/v1/options and sd-models reads `name [hash]` (computed here, torch-free, while the backend starts)
        threading.Thread(target=self._hash_selected_checkpoint, name="checkpoint-hash", daemon=True).start()
        self.client.start()
        if wait and not self.client.wait_ready():
            raise RuntimeError("the backend process did not start")

    def stop(self) -> None:
        self.client.stop()

    # -- models -----------------------------------------------------------------------------------
    def refresh_checkpoints(self) -> None:
        self.registry.refresh()
        self.parts.refresh()

    def current_checkpoint(self, override: str | None = None) -> ModelFile:
        return self.checkpoint_choice(override)[0][0]

    def _hash_selected_checkpoint(self) -> None:
        try:
            self.registry.with_hash(self.current_checkpoint())
        except UserError:
            pass  # no checkpoint yet: nothing to name
        except OSError as exc:
            log.warning("could not compute the checkpoint's hash: %s", exc)

    def checkpoint_choice(self, override: str | None = None) -> tuple[list[ModelFile], list[str]]:
        """The checkpoints a job tries, in order, and warnings about files passed over.

        The one the user asked for (the request's override, else the setting `sd_model_checkpoint`, which --ckpt
        and every selection set) is the only candidate: if it does not load, the user gets that error. With none
        asked for (or the setting's file gone), the default is the first file by name that is not known to be
        broken (`ModelRegistry.automatic_choice`); the backend moves on to the next when it fails to load."""
        self.registry.fill_cached_hashes()
        wanted = override or self.options["sd_model_checkpoint"]
        if wanted:
            try:
                return [self.registry.find_checkpoint(wanted)], []
            except UserError:
                if override:
                    raise
        candidates, notes = self.registry.automatic_choice()
        if wanted:
            notes = [f"The selected checkpoint {wanted} was not found; using {candidates[0].name}."] + notes
        return candidates, notes

    def _note_unloadable_checkpoints(self, job: Job) -> None:
        """Checkpoints the backend could not load while choosing the default are passed over from now on."""
        result = job.result
        failed = (result.get("unloadable_checkpoints") if isinstance(result, dict)
                  else getattr(result, "unloadable_checkpoints", None))
        for path, message in (failed or {}).items():
            self.registry.mark_unloadable(Path(path), message)

    def checkpoint_titles(self) -> list[str]:
        self.registry.fill_cached_hashes()
        return [f.title for f in self.registry.checkpoints]

    def _xyz_catalogs(self):
        """The names the X/Y/Z plot's dropdown axes are checked against."""
        from backend.core.xyz_axes import XYZCatalogs
        return XYZCatalogs(checkpoints=tuple(self.checkpoint_titles()), vaes=tuple(f.name for f in self.registry.vaes),
                           upscalers=tuple(self.postprocess.upscaler_names()), styles=tuple(self.styles.names()))

    def xyz_axis_choices(self, axis) -> list[str] | None:
        """The values an X/Y/Z axis type (`backend.core.xyz_axes.AxisType`) offers in the UI's values dropdown, from
        the current catalogs; None for an axis whose values are typed."""
        return self._xyz_catalogs().axis_choices(axis)

    def vae_choices(self) -> list[str]:
        return ["Automatic", "None"] + [f.name for f in self.registry.vaes]

    def no_checkpoint_message(self) -> str | None:
        if self.registry.checkpoints:
            return None
        folders = " or ".join(str(d) for d in self.paths.ckpt_dirs)
        return (f"No Stable Diffusion checkpoint found. Put a .safetensors or .ckpt file (SD 1.x, SD 2.x or SDXL) "
                f"in {folders}, then press the refresh button beside the checkpoint list.")

    # -- extra networks ---------------------------------------------------------------------------
    def lora_list(self) -> list[dict]:
        return self.networks.lora_api_list()

    def refresh_loras(self) -> None:
        self.networks.refresh_loras()

    def hypernetwork_list(self) -> list[dict]:
        return self.networks.hypernetwork_api_list()

    def embedding_list(self) -> dict:
        """A1111's loaded/skipped embeddings for the selected checkpoint."""
        try:
            ckpt = self.current_checkpoint()
        except UserError:
            ckpt = None
        return self.networks.embeddings_api(ckpt)

    def refresh_embeddings(self) -> None:
        self.networks.refresh_embeddings()

    # -- settings ---------------------------------------------------------------------------------
    def set_options(self, changes: dict) -> dict:
        """Store settings (Settings tab, quick settings, /sdapi/v1/options) through the options' one gate."""
        return self.options.update(changes)

    def posted_options(self, changes):
        """`POST /sdapi/v1/options`'s body less what `api_options` reports beside the settings: `sd_checkpoint_hash`
        (read-only), and `sd_model_checkpoint` when it is the title reported for the checkpoint in use (a client
        posting the options back leaves an automatic choice automatic, and loads nothing)."""
        if not isinstance(changes, dict) or not any(k in changes for k in REPORTED_OPTIONS):
            return changes
        reported = self.api_options()
        return {k: v for k, v in changes.items()
                if k not in REPORTED_OPTIONS or (k == "sd_model_checkpoint" and v != reported[k])}

    def api_options(self) -> dict:
        """`GET /sdapi/v1/options`: the settings, with the checkpoint in use named by its sd-models title
        (`name [hash]`, also when the setting is empty: the automatic choice) and its sha256 in
        `sd_checkpoint_hash` ("" until computed), as A1111 reports them."""
        values = self.options.as_dict()
        try:
            ckpt = self.current_checkpoint()
        except UserError:  # no checkpoint on disk
            values["sd_checkpoint_hash"] = ""
            return values
        values["sd_model_checkpoint"] = ckpt.title
        values["sd_checkpoint_hash"] = ckpt.sha256 or ""
        return values

    def _checkpoint_title(self, value: str) -> str:
        """The gate's check of `sd_model_checkpoint`: a known checkpoint, kept as its full title ("" = the first)."""
        return self.registry.find_checkpoint(value).title if value else value

    def _vae_choice(self, value: str) -> str:
        """The gate's check of `sd_vae`: Automatic, None or a known VAE file, kept as the name the lists show."""
        if value in ("", "Automatic", "None"):
            return value or "Automatic"
        return self.registry.find_vae(value).name

    def api_image_format(self, override_settings: dict | None = None):
        """The format of the API's base64 images (`samples_format`, `jpeg_quality`, `webp_lossless`, with a
        request's `override_settings` of them, checked by the gate when the job was submitted)."""
        from backend.core.images import ImageFormat
        keys = ("samples_format", "jpeg_quality", "webp_lossless")
        values = {k: self.options[k] for k in keys}
        wanted = {k: v for k, v in (override_settings or {}).items() if k in keys}
        if wanted:
            values.update(self.options.check(wanted, per_job=True))
        return ImageFormat.of(values)

    # -- jobs -------------------------------------------------------------------------------------
    def _job_payload(self, req: Txt2ImgRequest) -> dict:
        req, infotext_warnings = apply_infotext(self, req)  # `infotext` fills the fields the request left out
        limits.check_request(req, self.options)  # before any parsing: a huge prompt is refused at once
        req = self._unset_from_settings(req)
        req, script = self._selectable_script(req)
        (request_checks.check_img2img if isinstance(req, Img2ImgRequest) else request_checks.check_txt2img)(req)
        req = request_checks.with_latent_size(req)  # 513 x 700 makes 512 x 696, as A1111's latent
        self.postprocess.check_hires_upscaler(req)
        if isinstance(req, Img2ImgRequest):
            self.postprocess.check_sd_upscale(req)
        ignored = request_warnings(req) + infotext_warnings  # fields accepted but not acted on: named in the job's warnings
        for _label, derived in script[1].requests if script is not None else ():  # a script's lines may set them
            ignored += [w for w in request_warnings(derived) if w not in ignored]
        styles = list(dict.fromkeys(name for r in [req, *(d for _l, d in (script[1].requests if script else ()))]
                                    for name in r.styles or []))
        ignored += [f"style {name!r} does not exist (styles: {', '.join(self.styles.names()) or 'none'}); it was "
                    "not applied" for name in self.styles.unknown(styles)]
        firstpass = self._firstpass_image(req, ignored)  # decoded here; the backend gets the picture
        unused_images = {"firstpass_image": None, **({"latent_mask": None} if isinstance(req, Img2ImgRequest) else {})}
        req = req.model_copy(update=unused_images)  # base64 images not used (see `ignored`): not sent to the backend

        # override_settings pass the options' one gate, as a stored change would when they are kept afterwards;
        # the job sees only the checked, coerced values.
        keep = not req.override_settings_restore_afterwards
        overrides = self.options.check(req.override_settings, per_job=not keep)
        job_overrides = {k: v for k, v in overrides.items() if self.options.setting(k) is not None}
        req = req.model_copy(update={"override_settings": job_overrides})
        model = self._model_payload(job_overrides)
        # the refiners and hires. checkpoints the job's requests name (a script's cells may name others)
        model["second_checkpoints"] = self._second_checkpoints(
            [req, *(derived for _label, derived in (script[1].requests if script is not None else ()))], job_overrides)
        if firstpass is not None:
            model["firstpass_image"] = firstpass
        options = self.options.as_dict()
        options.update({k: v for k, v in job_overrides.items() if k not in ("sd_model_checkpoint", "sd_vae")})
        for key in limits.LIMIT_SETTINGS:  # a request cannot lift the server's limits
            options[key] = self.options[key]
        # The one resolution of the sampler names (the job's default_sampler may be overridden): the engine runs it.
        sampling = sampler_catalog.resolve_sampling(req, options["default_sampler"])
        payload = {"request": req, "sampling": sampling, **model, "options": options, "data_dir": self.paths.data_dir,
                   "warnings": ignored,  # the job's result carries these (info.warnings, the UI's info area)
                   "styles": self.styles.table(styles)}  # the texts of the styles the job names (applied by the engine)
        # the extensions' script files whose callbacks run in every job (on_cfg_denoiser, on_image_saved, ...)
        payload["a1111_callbacks"] = self.extension_scripts.backend_callback_files()
        # Always-on scripts (alwayson_scripts): each registered one checks its arguments here (e.g. ControlNet: images
        # decoded, models resolved); the backend receives them parsed, by name, and prepares their hooks.
        scripts, rest = self.scripts.for_job(req.alwayson_scripts, img2img=isinstance(req, Img2ImgRequest))
        if scripts:
            payload["scripts"] = scripts
            payload["request"] = req.model_copy(update={"alwayson_scripts": rest})
        if script is not None and script[0].engine:  # run by the backend's script registry around the pipeline
            # The sampling of every request the script derives (a line's --sampler_name, an X/Y/Z Sampler axis),
            # resolved here as the job's own: the engine looks it up by the request's sampler fields.
            derived_sampling = {sampler_catalog.sampler_fields(derived): sampler_catalog.resolve_sampling(
                derived, options["default_sampler"]) for _label, derived in script[1].requests}
            payload["script"] = {"name": script[0].name, "args": script[1].args, "sampling": derived_sampling}
            if script[1].models:  # cells with their own checkpoint or VAE (X/Y/Z plot): their files, resolved here
                payload["script"]["models"] = self._script_models(job_overrides, script[1].models)
            if script[1].always_on:  # cells with their own always-on scripts (X/Y/Z "[ControlNet] Weight"): parsed here
                payload["script"]["always_on"] = self._script_always_on(script[1].always_on,
                                                                        img2img=isinstance(req, Img2ImgRequest))
            payload["request"] = payload["request"].model_copy(update={"script_name": None, "script_args": []})
        if keep and overrides:
            self.options.update(overrides)
        return payload

    def _unset_from_settings(self, req: Txt2ImgRequest) -> Txt2ImgRequest:
        """As A1111: a request's `restore_faces` / `tiling` left null take the settings `face_restoration` /
        `tiling` (the request's own override_settings of them first, checked as the gate checks them)."""
        from backend.core.options import coerce
        update = {}
        for field, key in (("restore_faces", "face_restoration"), ("tiling", "tiling")):
            if getattr(req, field, None) is None:
                update[field] = coerce(self.options.setting(key),
                                       (req.override_settings or {}).get(key, self.options[key]))
        return req.model_copy(update=update) if update else req

    def _selectable_script(self, req: Txt2ImgRequest):
        """The request's `script_name`/`script_args` checked at the edge (`backend.core.scripts_catalog`): an unknown
        script or a bad argument is a 422 naming it; missing trailing arguments take their defaults. The requests a
        script derives (Prompts from file: one per line) pass the same checks as the job's own.
        -> (the request with the checked arguments, (ScriptSpec, PreparedScript) or None)."""
        from backend.core.scripts_catalog import PreparedScript, check_alwayson_names

        tab = "img2img" if isinstance(req, Img2ImgRequest) else "txt2img"
        try:
            check_alwayson_names(req.alwayson_scripts, tab, self.extension_scripts.always_on_tabs(),
                                 native=self.native_extensions.alwayson_tabs())
        except UserError as exc:  # a script of a disabled extension (ControlNet): say so
            off = {_loose_name(name): name for name in self._extensions_off}
            hints = [off[_loose_name(key)] for key in req.alwayson_scripts or {} if _loose_name(key) in off]
            if hints:
                exc = UserError(f"{exc.message} The extension {', '.join(hints)} is disabled (Extensions tab, or "
                                f"--disable-all-extensions / --disable-extra-extensions).", status=exc.status)
            raise exc from None
        spec = self.selectable_scripts.find(req.script_name, tab)
        if spec is None:
            return req.model_copy(update={"script_name": None, "script_args": []}), None
        checked = spec.check_args(req.script_args)
        req = req.model_copy(update={"script_name": spec.title, "script_args": checked})
        values = spec.values(checked)
        prepared = spec.prepare(req, values) if spec.prepare else PreparedScript(args=values)
        for label, derived in prepared.requests:
            try:
                limits.check_request(derived, self.options)
                (request_checks.check_img2img if tab == "img2img" else request_checks.check_txt2img)(derived)
                sampler_catalog.resolve_sampling(derived, self.options["default_sampler"])
            except UserError as exc:
                raise UserError(f"{label}: {exc.message}", status=422 if exc.status == 400 else exc.status) from None
        max_images = int(self.options["max_images_per_job"])
        if prepared.images is not None and prepared.images > max_images:
            raise UserError(f"{spec.title} would make {prepared.images} images; the limit is {max_images} images per "
                            f"job (Settings > Limits, max_images_per_job).")
        return req, (spec, prepared)

    def submit_txt2img(self, req: Txt2ImgRequest, listener: Callable[[Job], None] | None = None) -> Job:
        return self.client.submit("txt2img", self._job_payload(req), listener, task_id=req.force_task_id or None)

    def txt2img(self, req: Txt2ImgRequest) -> GenerationResult:
        return _wait(self.submit_txt2img(req))

    def submit_img2img(self, req: Img2ImgRequest, init_images: list[Image.Image], mask: Image.Image | None,
                       listener: Callable[[Job], None] | None = None) -> Job:
        """img2img/inpaint with decoded images (the request's base64 fields are not sent to the backend)."""
        request_checks.check_img2img_inputs(req, len(init_images), mask is not None)
        payload = self._job_payload(req.model_copy(update={"init_images": [], "mask": None}))
        payload["init_images"] = [img.copy() for img in init_images]
        payload["mask"] = mask.copy() if mask is not None else None
        return self.client.submit("img2img", payload, listener, task_id=req.force_task_id or None)

    def img2img(self, req: Img2ImgRequest) -> GenerationResult:
        """The API's img2img: base64 (or http(s) URL) `init_images` and `mask` as A1111 takes them."""
        return _wait(self.submit_img2img_base64(req))

    def submit_img2img_base64(self, req: Img2ImgRequest) -> Job:
        from backend.core.image_codec import decode_base64_image
        from backend.core.remote_images import RemoteImagePolicy

        remote = RemoteImagePolicy.from_options(self.options)  # http(s) URLs as A1111's api_enable_requests
        images = [decode_base64_image(data, f"init_images[{i}]", remote) for i, data in enumerate(req.init_images)]
        mask = decode_base64_image(req.mask, "mask", remote) if req.mask else None
        return self.submit_img2img(req, images, mask)

    def submit_img2img_batch(self, req: Img2ImgRequest, input_dir: str, output_dir: str, mask_dir: str,
                             listener: Callable[[Job], None] | None = None) -> Job:
        """img2img over a folder. Folders outside the data folder are refused when the UI is shared on a network."""
        if self.args.hide_ui_dir_config:
            raise UserError("Batch folders are disabled on this server (--hide-ui-dir-config).", status=403)
        request_checks.check_img2img_inputs(req, None, bool(mask_dir.strip()))
        batch = {"input_dir": self._batch_folder(input_dir, "Input", must_exist=True),
                 "output_dir": self._batch_folder(output_dir, "Output", write=True) if output_dir.strip() else None,
                 "mask_dir": self._batch_folder(mask_dir, "Mask", must_exist=True) if mask_dir.strip() else None}
        payload = self._job_payload(req.model_copy(update={"init_images": [], "mask": None}))
        if "script" in payload:
            raise UserError(f"The script {req.script_name!r} does not run on a folder batch in Easel; choose None "
                            f"(or Poor man's outpainting, Outpainting mk2, SD upscale) for the Batch tab.")
        payload["batch"] = batch
        return self.client.submit("img2img_batch", payload, listener, task_id=req.force_task_id or None)

    def _batch_folder(self, folder: str, what: str, must_exist: bool = False, write: bool = False) -> Path:
        if not folder or not folder.strip():
            raise UserError(f"{what} folder: none given.")
        path = Path(folder.strip()).expanduser()
        if not path.is_absolute():
            path = self.paths.data_dir / path
        path = path.resolve()
        shared = (self.args.listen or self.args.share
                  or self.args.server_name not in (None, "", "127.0.0.1", "localhost", "::1"))
        if shared and not path.is_relative_to(self.paths.data_dir.resolve()):
            raise UserError(f"{what} folder {path} is outside the data folder {self.paths.data_dir}; this server is "
                            f"shared on the network, so only folders inside it may be used.", status=403)
        if must_exist and not path.is_dir():
            raise UserError(f"{what} folder {path} does not exist.", status=404)
        if write:  # never into models/ (or any model folder of the flags) nor the program's code
            self.paths.check_output_folder(path, what)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{what} folder {path} cannot be created: {exc.strerror or exc}.") from exc
        return path

    def interrupt(self, job_ref: dict | None = None) -> None:
        """Stop the job of `job_ref` ({job_id, key}, the UI tab's own) on the worker that runs it; without one
        (A1111's /sdapi/v1/interrupt), every running job."""
        self.client.interrupt(self._job_id_of(job_ref))

    def skip(self, job_ref: dict | None = None) -> None:
        """Skip the current batch of `job_ref`'s job (without one: of every running job)."""
        self.client.skip(self._job_id_of(job_ref))

    def _job_id_of(self, job_ref) -> str | None:
        if isinstance(job_ref, dict) and job_ref.get("job_id"):
            job = self.client.find_job(job_ref.get("job_id", ""), job_ref.get("key", ""))
            if job is not None:
                return job.job_id
        return None

    def submit_memory(self) -> Job:
        """The backend's memory report (A1111's /sdapi/v1/memory body)."""
        return self.client.submit("memory", {})

    def _model_payload(self, overrides: dict | None = None) -> dict:
        """The job's checkpoint and VAE; with an automatic choice also the candidates to try after it
        (`checkpoint_fallbacks`, each with its VAE) and warnings about the files passed over (`checkpoint_notes`)."""
        overrides = overrides or {}
        candidates, notes = self.checkpoint_choice(overrides.get("sd_model_checkpoint"))
        choice = overrides.get("sd_vae", self.options["sd_vae"])

        def vae_file(ckpt: ModelFile) -> ModelFile | None:
            vae_path = self.registry.vae_for(ckpt, choice, self.args.vae_path, bool(overrides.get(
                "sd_vae_overrides_per_model_preferences", self.options["sd_vae_overrides_per_model_preferences"])))
            if vae_path is None:
                return None
            return next((f for f in self.registry.vaes if f.path == vae_path.resolve()),
                        ModelFile(name=vae_path.name, path=vae_path.resolve()))

        # "VAE / Text Encoder": the parts that complete a FLUX.1 / SD3 checkpoint (an SD checkpoint ignores them)
        parts, gone = self.parts.chosen_files(overrides.get("forge_additional_modules",
                                                            self.options["forge_additional_modules"]))
        return {"checkpoint": candidates[0], "vae": vae_file(candidates[0]), "parts": parts,
                "checkpoint_fallbacks": [(c, vae_file(c)) for c in candidates[1:]], "checkpoint_notes": notes + gone}

    def _second_checkpoints(self, requests: list, job_overrides: dict) -> dict:
        """The refiners (`refiner_checkpoint`) and hires. fix checkpoints (`hr_checkpoint_name`, used only with
        enable_hr) that the job's requests name, resolved to their files and VAEs as the job's own checkpoint is:
        {name as the request gives it: {"checkpoint", "vae"}} (the backend's `switch_model` looks them up by the
        request's field). An unknown name is the user's error, naming the field."""
        from backend.core.second_checkpoints import hires_checkpoint_name, refiner_name

        out: dict = {}
        for req in requests:
            for field, name in (("refiner_checkpoint", refiner_name(req)), ("hr_checkpoint_name",
                                                                            hires_checkpoint_name(req))):
                if name is None or name in out:
                    continue
                try:
                    chosen = self._model_payload({**job_overrides, "sd_model_checkpoint": name})
                except UserError as exc:
                    raise UserError(f"{field}: {exc.message}", status=exc.status) from None
                out[name] = {"checkpoint": chosen["checkpoint"], "vae": chosen["vae"], "parts": chosen["parts"]}
        return out

    @staticmethod
    def _firstpass_image(req: Txt2ImgRequest, warnings: list[str]) -> Image.Image | None:
        """A txt2img request's `firstpass_image` (A1111 1.7+, base64): with hires. fix, the picture its second pass
        starts from instead of sampling a first pass; without hires. fix it is not used (a warning says so)."""
        data = getattr(req, "firstpass_image", None)
        if not data:
            return None
        if not getattr(req, "enable_hr", False):
            warnings.append("firstpass_image is used only with hires. fix (enable_hr); the image was generated "
                            "from noise.")
            return None
        from backend.core.image_codec import decode_base64_image
        return decode_base64_image(data, "firstpass_image")

    def _script_always_on(self, variants: dict, *, img2img: bool) -> dict:
        """The always-on scripts of a script's generations that run with their own (`PreparedScript.always_on`),
        each checked and parsed like a job's: {key: {name: parsed arguments}}; a value the script refuses is a 422
        naming it."""
        parsed = {}
        for key, (label, alwayson) in variants.items():
            try:
                parsed[key] = self.scripts.for_job(alwayson, img2img=img2img)[0]
            except UserError as exc:
                raise UserError(f"{label} is refused: {exc.message}",  # a script argument: 422, as the others
                                status=422 if exc.status in (400, 404) else exc.status) from None
        return parsed

    def _script_models(self, job_overrides: dict, choices: list[dict]) -> dict:
        """The files of the model settings a script's generations choose (X/Y/Z plot's Checkpoint name and VAE
        values), resolved as the job's own (`_model_payload`) -> {(sd_model_checkpoint, sd_vae) as the generation's
        request carries them in override_settings: [(checkpoint, VAE or None), ...]}. With no checkpoint chosen the
        list holds a pair for each automatic candidate: the backend takes the one of the checkpoint it loaded."""
        table = {}
        for choice in choices:
            settings = {**job_overrides, **choice}
            key = (settings.get("sd_model_checkpoint"), settings.get("sd_vae"))
            model = self._model_payload(settings)
            table[key] = [(model["checkpoint"], model["vae"]), *model["checkpoint_fallbacks"]]
        return table

    def submit_load_checkpoint(self, listener: Callable[[Job], None] | None = None,
                               on_end: Callable[[Job], None] | None = None) -> Job:
        """Load the selected checkpoint (and VAE) into the backend's cache ahead of the next job."""
        payload = self._model_payload()
        payload["options"] = self.options.as_dict()
        payload["a1111_callbacks"] = self.extension_scripts.backend_callback_files()  # on_model_loaded
        return self.client.submit("load", payload, listener, on_end=on_end)

    def submit_options(self, changes: dict) -> Job | None:
        """Store settings through the gate; when they choose a checkpoint or VAE, load it now, as A1111 does (the
        load job; None when no model setting is among `changes`). When that load fails, the previous choice is put
        back before anyone waiting sees the error (A1111 does the same), so a file that does not load never stays
        selected for the jobs after it."""
        previous = {k: self.options[k] for k in MODEL_SETTINGS if k in changes}
        stored = self.set_options(changes)
        if not any(k in stored for k in MODEL_SETTINGS):
            return None

        def put_back_on_failure(job: Job) -> None:
            if getattr(job.error, "status", None) == MISSING_PARTS_STATUS:
                # a FLUX.1 / SD3 file chosen before its "VAE / Text Encoder" parts: it stays chosen, the message
                # says what to add, and the next generation loads it with them (Forge's order of choosing)
                return
            if job.error is not None:
                log.warning("loading the chosen model failed; the previous choice %s is kept", previous)
                self.options.update(previous, from_flags=True)  # the value the gate took before: no second check

        return self.submit_load_checkpoint(on_end=put_back_on_failure)

    def load_checkpoint(self) -> dict:
        return _wait(self.submit_load_checkpoint())

    def change_options(self, changes: dict) -> None:
        """`submit_options`, waiting for the model load it starts (its error raised)."""
        job = self.submit_options(changes)
        if job is not None:
            _wait(job)

    def submit_merge(self, req, listener: Callable[[Job], None] | None = None) -> Job:
        """The Checkpoint Merger (`backend/merger.py`): checked against the files' headers, then merged by the
        backend; when it ends the checkpoint lists are read again, so the new file is selectable."""
        from backend.merger import merge_folder, plan_merge
        payload = plan_merge(req, self.registry, merge_folder(self.paths, self.args))
        return self.client.submit("merge_checkpoints", payload, listener, on_end=lambda job: self.refresh_checkpoints())

    def submit_unload_checkpoint(self) -> Job:
        return self.client.submit("unload", {})

    # -- PNG info -----------------------------------------------------------------------------------
    @staticmethod
    def open_image(data: bytes) -> Image.Image:
        return open_image_bytes(data)

    @staticmethod
    def png_info(image: Image.Image) -> tuple[str, dict, dict]:
        """-> (infotext or "", parsed parameters, other text chunks)."""
        text = infotext.read_infotext_from_image(image) or ""
        params = infotext.parse_infotext(text) if text else {}
        extra = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return text, params, extra

    @staticmethod
    def sampler_list() -> list[dict]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in sampler_catalog.SAMPLERS]

    @staticmethod
    def scheduler_list() -> list[dict]:
        return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for s in sampler_catalog.SCHEDULERS]


def _loose_name(name) -> str:
    """An extension's folder name or an always-on script's name, compared loosely ("soft-inpainting")."""
    return " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())


def _wait(job: Job) -> GenerationResult:
    job.done.wait()
    if job.error:
        raise job.error
    return job.result
