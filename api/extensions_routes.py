"""Extensions over HTTP: A1111's `GET /sdapi/v1/extensions`, and the enabled extensions' front-end files
(`javascript/*.js`, `style.css`, what they refer to) that the page's <head> loads from `/extension-assets/`."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from api import models
from api.errors import A1111Route
from backend.core.errors import UserError
from backend.extensions import ASSET_PREFIX, asset_path
from backend.service import EaselService


def build_extensions_router(service: EaselService, dependencies: list | None = None,
                            log_requests: bool = False) -> APIRouter:
    route_class = type("EaselExtensionsRoute", (A1111Route,), {"log_requests": log_requests})
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [], route_class=route_class)

    @router.get("/extensions", response_model=list[models.ExtensionItem])
    def extensions() -> list[dict]:
        return service.extensions.api_list()

    return router


def build_extension_assets_router(service: EaselService) -> APIRouter:
    """The files of the extensions enabled when the server started (changes apply at the next start, as the
    page's <head> was built then). Only files inside an extension's folder: see `backend.extensions.asset_path`."""
    enabled = service.extensions.enabled()
    router = APIRouter(prefix=f"/{ASSET_PREFIX}", route_class=A1111Route)

    @router.get("/{name}/{relative:path}")
    def asset(name: str, relative: str, request: Request) -> FileResponse:
        if not _logged_in(request):
            raise UserError("Not authenticated: log in to the web UI first.", status=401)
        return FileResponse(asset_path(enabled, name, relative), headers={"Cache-Control": "no-cache"})

    return router


def _logged_in(request: Request) -> bool:
    """With web UI logins (--gradio-auth), the files are for logged-in pages only: Gradio's session cookie, checked
    as Gradio checks it for its own routes."""
    app = request.app
    if getattr(app, "auth", None) is None:
        return True
    cookie_id = getattr(app, "cookie_id", "")
    token = (request.cookies.get(f"access-token-{cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{cookie_id}"))
    return token is not None and token in getattr(app, "tokens", {})
