"""HTTP Basic authentication for the API (`--api-auth user:pass,...`), compared in constant time.

Failed logins are counted per client address by a `LoginThrottle` (api/http_guard.py): past a few, the
client gets 429 with Retry-After for a growing time, so passwords cannot be guessed at network speed.
"""
from __future__ import annotations

import base64
import binascii
import math
import secrets

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials


def parse_basic(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header value; None when absent or not Basic."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class BasicAuth:
    """Checks Basic credentials against the logins, slowing down clients that keep failing."""

    def __init__(self, logins: list[tuple[str, str]], throttle=None):
        self.logins = logins
        self.throttle = throttle

    def matches(self, username: str, password: str) -> bool:
        ok = False
        for user, expected in self.logins:
            user_ok = secrets.compare_digest(username.encode(), user.encode())
            pass_ok = secrets.compare_digest(password.encode(), expected.encode())
            ok |= user_ok and pass_ok
        return ok

    def check(self, client: str, credentials: tuple[str, str] | None) -> None:
        """Returns when the credentials are right; raises HTTPException 429 (throttled) or 401."""
        wait = self.throttle.retry_after(client) if self.throttle else 0.0
        if wait > 0:
            raise HTTPException(status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                                detail=f"Too many failed logins from this address; try again in {math.ceil(wait)} s.",
                                headers={"Retry-After": str(math.ceil(wait))})
        if credentials is not None and self.matches(*credentials):
            if self.throttle:
                self.throttle.succeeded(client)
            return
        if credentials is not None and self.throttle:
            self.throttle.failed(client)  # a request without credentials guesses nothing
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def basic_auth_dependency(logins: list[tuple[str, str]], throttle=None):
    security = HTTPBasic(auto_error=False)  # declares the scheme in /docs; the header is read below
    auth = BasicAuth(logins, throttle)

    def check(request: Request, _credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        auth.check(client_address(request), parse_basic(request.headers.get("authorization")))

    return check
