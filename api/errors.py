"""Error responses in A1111's JSON shape: {"error", "detail", "body", "errors"}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.client import BackendError
from backend.core.errors import UserError

log = logging.getLogger("easel.api")


def error_body(kind: str, message: str) -> dict:
    # A message echoing the request could hold text that is not valid Unicode; the answer must still encode.
    message = message.encode("utf-8", "replace").decode("utf-8")
    return {"error": kind, "detail": message, "body": "", "errors": message}


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}")
    return "Invalid request: " + "; ".join(parts)


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The A1111-shaped JSON answer for any exception raised while serving an API route."""
    if isinstance(exc, UserError):
        return JSONResponse(status_code=exc.status, content=error_body("UserError", exc.message), headers=exc.headers)
    if isinstance(exc, BackendError):
        return JSONResponse(status_code=exc.status, content=error_body("BackendError", exc.message))
    if isinstance(exc, RequestValidationError):
        return JSONResponse(status_code=422, content=error_body("RequestValidationError", validation_message(exc)))
    if isinstance(exc, StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content=error_body("HTTPException", str(exc.detail)),
                            headers=getattr(exc, "headers", None))
    log.error("API error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content=error_body(type(exc).__name__, f"Internal error: {exc}"))


class A1111Route(APIRoute):
    """Answers every error of its route in A1111's JSON shape.

    Done per route rather than with app exception handlers: Gradio builds its
    app (and its middleware stack) before the API routes are added, after
    which app-level handlers would no longer be consulted.
    """

    log_requests = False

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                response = error_response(request, exc)
            if self.log_requests:
                log.info("API %s %s -> %s", request.method, request.url.path, response.status_code)
            return response

        return handle


def install_error_handlers(app: FastAPI) -> None:
    """For the API-only app: errors outside the routes (404, 405) in the same shape."""
    async def _error(request: Request, exc: Exception):
        return error_response(request, exc)

    for kind in (StarletteHTTPException, RequestValidationError, UserError, BackendError, Exception):
        app.add_exception_handler(kind, _error)
