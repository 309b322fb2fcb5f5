"""HTTP-level guards of the app process, as ASGI middleware for both the Gradio app and the API-only app.

- `HostCheck`: answers 400 to a `Host` header that names neither this machine nor an allowed host, so a web
  page in the user's browser cannot reach a localhost Easel by DNS rebinding (its host name would be the
  attacker's domain). IP literals are always allowed: rebinding needs a domain name.
- `BodyLimit`: answers 413 to a request body larger than the setting `api_max_request_body_mb`, from its
  Content-Length before reading it, or as soon as a streamed body passes the limit.
- `DocsAuth`: with `--api-auth`, `/docs`, `/redoc` and `/openapi.json` need the API's login as well.
- `GradioLoginThrottle`: failed logins to the web UI (`POST /login`) count against the client address in the
  same `LoginThrottle` as the API's Basic auth; past a few, 429 with Retry-After for a growing time.
"""
from __future__ import annotations

import collections
import ipaddress
import math
import socket
import threading
import time
from typing import Callable, Iterable

from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from api.auth import BasicAuth, parse_basic
from api.errors import error_body

LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def host_name(host_header: str) -> str:
    """The host part of a Host header value, lower case, without port, brackets or trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class AllowedHosts:
    """Host names this server answers to. `*` allows any; `.example.org` allows example.org and its subdomains."""

    def __init__(self, names: Iterable[str] = ()):
        self.any = False
        self._names: set[str] = set()
        self._suffixes: set[str] = set()
        self._lock = threading.Lock()
        for name in (*LOCAL_NAMES, *names):
            self.add(name)

    def add(self, name: str | None) -> None:
        name = (name or "").strip().lower()
        if not name:
            return
        with self._lock:
            if name == "*":
                self.any = True
            elif name.startswith("."):
                self._suffixes.add(name.rstrip("."))
                self._names.add(name[1:].rstrip("."))
            else:
                self._names.add(host_name(name))

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return True  # HTTP/1.0 without Host: no browser sends that, so no rebinding through it
        host = host_name(host_header)
        if self.any or _is_ip_literal(host) or host.endswith(".localhost"):
            return True
        with self._lock:
            return host in self._names or any(host.endswith(s) for s in self._suffixes)


def this_machine_names() -> list[str]:
    names = []
    try:
        hostname = socket.gethostname()
        names += [hostname, hostname + ".local"]  # .local: the mDNS name LAN clients often use
        names.append(socket.getfqdn())
    except OSError:
        pass
    return names


def allowed_hosts_for(args) -> AllowedHosts:
    """Local names, this machine's names, the bind address (--server-name) and `--allowed-hosts`."""
    extra = [h for h in (getattr(args, "allowed_hosts", None) or "").split(",") if h.strip()]
    return AllowedHosts([*this_machine_names(), args.server_name or "", *extra])


class LoginThrottle:
    """Failed logins per client address. After `free_failures` within `window_s`, each further failure blocks
    the client for twice as long as the last (from `first_block_s` up to `max_block_s`); a success clears it.
    Other clients are not affected."""

    def __init__(self, free_failures: int = 5, window_s: float = 900.0, first_block_s: float = 2.0,
                 max_block_s: float = 300.0, max_clients: int = 10000, clock: Callable[[], float] = time.monotonic):
        self.free_failures = free_failures
        self.window_s = window_s
        self.first_block_s = first_block_s
        self.max_block_s = max_block_s
        self.max_clients = max_clients
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, ()) if now - t < self.window_s]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before its next login attempt is looked at (0: now)."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            over = len(times) - self.free_failures
            if over < 0:
                return 0.0
            block = min(self.max_block_s, self.first_block_s * 2 ** over)
            return max(0.0, times[-1] + block - now)

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            times.append(now)
            self._failures[client] = times
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:  # a flood of addresses cannot grow this without bound
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


# -- ASGI middleware ---------------------------------------------------------------------------------

def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _client(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


async def _answer(scope, receive, send, status: int, message: str, headers: dict | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await JSONResponse(error_body("HTTPException", message), status_code=status, headers=headers)(scope, receive, send)


class HostCheck:
    def __init__(self, app, allowed: AllowedHosts):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = _header(scope, b"host")
            if not self.allowed.allows(host):
                name = host_name(host)
                await _answer(scope, receive, send, 400,
                              f"Host {name!r} is not allowed. If this server should answer to that name, start it "
                              f"with --allowed-hosts {name}.")
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, limit_bytes: Callable[[], int]):
        self.app = app
        self.limit_bytes = limit_bytes

    def _message(self, limit: int) -> str:
        return (f"The request body is larger than {limit / 2**20:g} MB, the limit set by the setting "
                f"api_max_request_body_mb.")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_bytes()
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await _answer(scope, receive, send, 413, self._message(limit))
            return
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def watched_send(message):
            nonlocal started
            if over and not started:
                return  # the app's answer to the cut body is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await JSONResponse(error_body("HTTPException", self._message(limit)), status_code=413)(scope, receive, send)


class DocsAuth:
    """The API's docs and schema under the API's login (they list every route and field)."""

    PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")

    def __init__(self, app, auth: BasicAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) in self.PATHS:
            from fastapi import HTTPException
            try:
                self.auth.check(_client(scope), parse_basic(_header(scope, b"authorization")))
            except HTTPException as exc:
                await _answer(scope, receive, send, exc.status_code, str(exc.detail), exc.headers)
                return
        await self.app(scope, receive, send)


class GradioLoginThrottle:
    """Gradio's `POST /login` answers 400 to wrong credentials and 200 to right ones: count them per client."""

    def __init__(self, app, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or _route_path(scope) != "/login":
            await self.app(scope, receive, send)
            return
        client = _client(scope)
        wait = self.throttle.retry_after(client)
        if wait > 0:
            await _answer(scope, receive, send, 429,
                          f"Too many failed logins from this address; try again in {math.ceil(wait)} s.",
                          {"Retry-After": str(math.ceil(wait))})
            return
        status = None

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watched_send)
        if status in (400, 401):
            self.throttle.failed(client)
        elif status is not None and 200 <= status < 300:
            self.throttle.succeeded(client)


def guard_middleware(allowed: AllowedHosts, body_limit_bytes: Callable[[], int], throttle: LoginThrottle,
                     api_logins: list[tuple[str, str]], gradio_login: bool) -> list[Middleware]:
    """The guards in the order a request meets them (the first is outermost)."""
    middleware = [Middleware(HostCheck, allowed=allowed), Middleware(BodyLimit, limit_bytes=body_limit_bytes)]
    if api_logins:
        middleware.append(Middleware(DocsAuth, auth=BasicAuth(api_logins, throttle)))
    if gradio_login:
        middleware.append(Middleware(GradioLoginThrottle, throttle=throttle))
    return middleware
