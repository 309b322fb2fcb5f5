"""ControlNet (as the sd-webui-controlnet extension gives it to AUTOMATIC1111), a built-in Easel extension.

What it adds: the component `controlnet` (the ControlNet model files, preprocessor lists, detect jobs:
`backend.controlnet.service.ControlNetService`), the always-on script `controlnet` (app side
`backend.controlnet.always_on`, engine side `backend.engine.controlnet.script`), the job kind `controlnet_detect`,
the `/controlnet/...` API routes (`api.controlnet_routes`), the units accordion under txt2img and img2img, the
ControlNet tab (`ui.controlnet`) and the X/Y/Z plot's "[ControlNet] ..." axes (`backend.controlnet.xyz_axes`). Its settings (`control_net_*`) are in `backend.core.options`. Disabling this
extension (Extensions tab, --disable-all-extensions) removes all of these."""
from __future__ import annotations

NAME = "controlnet"


def _service(service):
    from backend.controlnet.service import ControlNetService
    return ControlNetService(service.paths, service.options, service.client)


def _script(service):
    from backend.controlnet.always_on import ControlNetScript
    return ControlNetScript(service.components[NAME])


def _router(service, dependencies, log_requests):
    from api.controlnet_routes import build_controlnet_router
    return build_controlnet_router(service, dependencies, log_requests=log_requests)


def _units(service, tab, **context):
    from ui.controlnet import build_units
    return build_units(service, tab, img2img=tab == "img2img", **context)


def _xyz_axes(service):
    from backend.controlnet.xyz_axes import controlnet_axes
    return controlnet_axes(service.components[NAME])


def _tab(service):
    from ui.controlnet import build_tab
    build_tab(service)


def register(registry) -> None:
    registry.add_component(NAME, _service)
    registry.add_always_on_script(NAME, app=_script, engine="backend.engine.controlnet.script")
    registry.add_job_kind("controlnet_detect", script=NAME, function="detect")
    registry.add_api_router(_router)
    registry.add_generation_ui(_units)
    registry.add_tab("ControlNet", _tab, elem_id="controlnet")
    registry.add_xyz_axes(_xyz_axes)
