"""Error responses in A1111's JSON shape: {"error", "detail", "body", "errors"}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.client import BackendError
from backend.errors import UserError

log = logging.getLogger("easel.api")


def error_body(kind: str, message: str) -> dict:
    return {"error": kind, "detail": message, "body": "", "errors": message}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(_request: Request, exc: UserError):
        return JSONResponse(status_code=exc.status, content=error_body("UserError", exc.message))

    @app.exception_handler(BackendError)
    async def _backend_error(_request: Request, exc: BackendError):
        return JSONResponse(status_code=exc.status, content=error_body("BackendError", exc.message))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}")
        message = "Invalid request: " + "; ".join(parts)
        return JSONResponse(status_code=422, content=error_body("RequestValidationError", message))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content=error_body("HTTPException", str(exc.detail)),
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("API error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content=error_body(type(exc).__name__, f"Internal error: {exc}"))
