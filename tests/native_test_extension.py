"""An Easel-native test extension (docs/extensions.md), written into a data dir's `extensions/` by fixtures:
an always-on script "native invert" whose engine part (a file in the extension) inverts the job's pictures in the
`after_decode` sampling hook, a job kind of its own, a setting, a component, an API router and a generation UI part."""

EASEL_EXTENSION = '''
from backend.core.errors import UserError


class Greeter:
    def __init__(self, service):
        self.service = service
        self.greeting = "hello from native-test"


class InvertScript:
    name = "native invert"

    def for_job(self, entry, *, img2img):
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, list) or any(not isinstance(a, bool) for a in args):
            raise UserError("native invert: args must be a list of booleans")
        return True if args and args[0] else None


def _router(service, dependencies, log_requests):
    from fastapi import APIRouter
    from api.jobs import run_job

    router = APIRouter(prefix="/native-test", dependencies=dependencies)

    @router.get("/greeting")
    def greeting():
        return {"greeting": service.components["native-test"].greeting}

    @router.post("/double")
    async def double(n: int):
        factor = service.options["native_test_factor"]
        return await run_job(service.client.submit, "native_test_double", {"n": n, "factor": factor})

    return router


class Panel:
    def __init__(self, checkbox):
        self.inputs = [checkbox]

    def alwayson_scripts(self, values):
        return {"native invert": {"args": [True]}} if values[0] else {}


def _panel(service, tab, **context):
    import gradio as gr
    with gr.Accordion("Native invert", open=False, elem_id=f"{tab}_native_invert"):
        return Panel(gr.Checkbox(False, label="Invert the pictures", elem_id=f"{tab}_native_invert_enabled"))


def register(registry):
    from backend.core.options import Setting
    registry.add_setting(Setting("native_test_factor", 2, "Factor of the double job", "Native test", int,
                                 minimum=1, maximum=10))
    registry.add_component("native-test", Greeter)
    registry.add_always_on_script("native invert", app=lambda service: InvertScript(), engine="engine_part.py")
    registry.add_job_kind("native_test_double", script="native invert", function="double")
    registry.add_api_router(_router)
    registry.add_generation_ui(_panel)
'''

ENGINE_PART = '''
from PIL import ImageOps

from backend.engine.sampling_hooks import SamplingHook


class Invert(SamplingHook):
    def after_decode(self, state, images):
        return [ImageOps.invert(image.convert("RGB")) for image in images]


def runtime(policy, models_dir):
    return {"calls": 0}


def prepare(enabled, job, ctx, runtime):
    ctx.extra_params["Native invert"] = True  # written into the infotext
    return [Invert()], []


def double(payload, runtime):
    runtime["calls"] += 1
    return {"double": payload["factor"] * payload["n"], "calls": runtime["calls"]}
'''


def write(extensions_dir, name="native-test"):
    folder = extensions_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "easel_extension.py").write_text(EASEL_EXTENSION)
    (folder / "engine_part.py").write_text(ENGINE_PART)
    return folder
