"""Easel's app process: starts the backend process, serves the web UI and the API.

Run through `launch.py` (which prepares the environment), or directly:
`python app.py [flags]` (see `python app.py --help`).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from backend.core.cmd_args import parse_args, parse_logins

log = logging.getLogger("easel")


def _logins(args) -> list[tuple[str, str]]:
    logins = parse_logins(args.gradio_auth)
    if args.gradio_auth_path:
        logins += parse_logins(Path(args.gradio_auth_path).read_text(encoding="utf-8"))
    return logins


def create_api_app(service, args, guards: list, throttle, server_commands=None):
    """A FastAPI app with the /sdapi/v1 routes (used alone with --nowebui)."""
    from fastapi import FastAPI

    from api.errors import install_error_handlers
    app = FastAPI(title="Easel API", version="0.1.0", middleware=guards + api_middleware(args))
    install_error_handlers(app)
    add_api(app, service, args, throttle, server_commands)
    return app


def guard_middleware(service, args, allowed_hosts, throttle) -> list:
    """The HTTP guards (api/http_guard.py): Host check, body size limit, docs behind --api-auth, login throttle."""
    from api.http_guard import guard_middleware as guards
    return guards(allowed_hosts, lambda: service.options["api_max_request_body_mb"] * 2**20, throttle,
                  parse_logins(args.api_auth), gradio_login=bool(_logins(args)) and not args.nowebui)


def warn_if_exposed(args) -> None:
    """A loud warning for each part that other machines can reach without a login (the UI shows it too)."""
    from backend.exposure import exposure_warnings
    for warning in exposure_warnings(args):
        log.warning("\n%s\n*** SECURITY WARNING: %s\n%s", "*" * 100, warning, "*" * 100)


def warn_ignored_flags(args) -> None:
    """A warning for each flag given that Easel accepts but does not act on (`backend.core.ignored_inputs`)."""
    from backend.core.ignored_inputs import flag_warnings
    for warning in flag_warnings(args):
        log.warning(warning)


def api_middleware(args) -> list:
    """Middleware the API needs, given to the app when it is created (it cannot be added to a started one)."""
    from fastapi.middleware.cors import CORSMiddleware
    from starlette.middleware import Middleware

    if not (args.cors_allow_origins or args.cors_allow_origins_regex):
        return []
    origins = args.cors_allow_origins.split(",") if args.cors_allow_origins else []
    return [Middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=args.cors_allow_origins_regex,
                       allow_methods=["*"], allow_credentials=True, allow_headers=["*"])]


def add_api(app, service, args, throttle=None, server_commands=None) -> None:
    from fastapi import Depends

    from api.auth import basic_auth_dependency
    from api.routes import build_router

    deps = []
    if args.api_auth:
        deps.append(Depends(basic_auth_dependency(parse_logins(args.api_auth), throttle)))
    app.include_router(build_router(service, deps, log_requests=bool(args.api_log)))
    for build in service.native_extensions.routers:  # the extensions' routers (ControlNet's /controlnet/...)
        app.include_router(build(service, deps, bool(args.api_log)))
    from api.postprocess_routes import build_postprocess_router
    app.include_router(build_postprocess_router(service, deps, log_requests=bool(args.api_log)))
    from api.interrogate_routes import build_interrogate_router
    app.include_router(build_interrogate_router(service, deps, log_requests=bool(args.api_log)))
    from api.networks_routes import build_networks_router
    app.include_router(build_networks_router(service, deps, log_requests=bool(args.api_log)))
    from api.extensions_routes import build_extensions_router
    app.include_router(build_extensions_router(service, deps, log_requests=bool(args.api_log)))
    from api.internal_routes import build_internal_progress_router  # a task's progress by its force_task_id
    app.include_router(build_internal_progress_router(service.client, deps, log_requests=bool(args.api_log)))
    if args.api_server_stop and server_commands is not None:  # as A1111: these routes exist only with the flag
        from api.errors import A1111Route
        from api.server_routes import build_server_control_router
        route_class = type("EaselApiRoute", (A1111Route,), {"log_requests": bool(args.api_log)})
        app.include_router(build_server_control_router(server_commands, service.client.kill, deps, route_class))
    from api.merger_routes import build_merger_router
    app.include_router(build_merger_router(service, deps, log_requests=bool(args.api_log)))


def extensions_app_started(service, demo, app) -> None:
    """A1111's `on_app_started(demo, app)` callbacks of the extensions (demo None with --nowebui), once the app and
    its routes exist; the routes they add go in front of Gradio's catch-all ones, as ours do."""
    before = list(app.router.routes)
    service.extension_scripts.app_started(demo, app, service.options)
    added = [r for r in app.router.routes if r not in before]
    if added:
        app.router.routes[:] = added + [r for r in app.router.routes if r not in added]


def stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`, the launcher's parent) ends the app as Ctrl+C does: the web server
    closes and `service.stop()` stops the backend process, so nothing keeps serving or holding the port."""
    import signal
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl+C, SIGTERM or /sdapi/v1/server-stop (-> 0), or /sdapi/v1/server-restart
    (-> `RESTART_EXIT_CODE`)."""
    stop_on_sigterm()
    args = parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.unknown:
        log.warning("ignoring unknown flags: %s", " ".join(args.unknown))
    warn_ignored_flags(args)
    from backend.service import EaselService

    service = EaselService(args)
    service.extensions.log_state()
    host = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
    from api.http_guard import LoginThrottle, allowed_hosts_for
    allowed_hosts, throttle = allowed_hosts_for(args), LoginThrottle()
    guards = guard_middleware(service, args, allowed_hosts, throttle)
    warn_if_exposed(args)
    from api.server_routes import RESTART_EXIT_CODE, ServerCommands
    server_commands = ServerCommands()  # what --api-server-stop's routes post for this thread
    command = None
    try:
        service.start(wait=False)
        msg = service.no_checkpoint_message()
        if msg:
            log.warning(msg)
        if args.nowebui:
            import uvicorn
            app = create_api_app(service, args, guards, throttle, server_commands)
            extensions_app_started(service, None, app)
            log.info("API only: http://%s:%d/sdapi/v1 (docs at /docs)", host, args.port)
            import threading

            class Server(uvicorn.Server):
                def handle_exit(self, sig, frame) -> None:
                    # Ctrl+C / SIGTERM: uvicorn waits for the requests in progress, so their jobs end first (503)
                    threading.Thread(target=service.stop, name="easel-stop", daemon=True).start()
                    super().handle_exit(sig, frame)

            server = Server(uvicorn.Config(app, host=host, port=args.port, ssl_keyfile=args.tls_keyfile,
                                           ssl_certfile=args.tls_certfile, root_path=args.subpath or "",
                                           log_level="warning"))

            def stop_on_command() -> None:  # a posted stop/restart ends uvicorn's loop in this (main) thread
                nonlocal command
                command = server_commands.wait(lambda: not server.should_exit)
                if command is not None:
                    service.stop()  # the jobs in progress answer 503 first (uvicorn waits for them)
                server.should_exit = True
            threading.Thread(target=stop_on_command, name="easel-server-commands", daemon=True).start()
            server.run()
            return RESTART_EXIT_CODE if command == "restart" else 0
        from ui.layout import CSS, build_ui
        from ui import icons, page_scripts
        from ui.theme import theme_head
        from backend.extensions import page_head
        from starlette.middleware import Middleware
        demo = build_ui(service)
        demo.queue(default_concurrency_limit=None)
        logins = _logins(args)
        app, local_url, share_url = demo.launch(
            server_name=host, server_port=args.port, share=args.share, prevent_thread_lock=True,
            auth=logins or None, ssl_keyfile=args.tls_keyfile, ssl_certfile=args.tls_certfile,
            root_path=args.subpath, inbrowser=args.autolaunch, css=CSS + icons.css(), head=theme_head(args.theme) + icons.head() + page_scripts.head() + page_head(service.extensions.enabled()), quiet=True,
            max_file_size=service.options["upload_max_file_size_mb"] * 2**20,
            app_kwargs={"middleware": guards + (api_middleware(args) if args.api else [])
                        + [Middleware(demo.easel_live_page.middleware)],  # each page served as the server is now
                        # the API's docs, as with --nowebui (Gradio turns them off by default)
                        **({"docs_url": "/docs", "redoc_url": "/redoc"} if args.api else {})},
            # Gradio's start-up self-check (one HEAD of the page, 3 s timeout, meant for notebooks that cannot reach
            # localhost) stops the app when the page takes longer to render, as on a busy or slow CPU: skipped, the
            # server is up either way (gradio is pinned, so this private switch stays).
            _frontend=False,
        )
        service.options.on_change(lambda key, value: setattr(demo, "max_file_size", value * 2**20)
                                  if key == "upload_max_file_size_mb" else None)
        if share_url:
            from urllib.parse import urlsplit
            allowed_hosts.add(urlsplit(share_url).hostname)
        gradio_routes = list(app.router.routes)
        from api.extensions_routes import build_extension_assets_router
        app.include_router(build_extension_assets_router(service))  # the extensions' scripts and styles
        if args.api:
            add_api(app, service, args, throttle, server_commands)
        # Gradio's catch-all routes were registered first: move ours to the front.
        api_routes = [r for r in app.router.routes if r not in gradio_routes]
        others = [r for r in app.router.routes if r not in api_routes]
        app.router.routes[:] = api_routes + others
        extensions_app_started(service, demo, app)
        print(f"Running on local URL:  {local_url}", flush=True)
        if share_url:
            print(f"Running on public URL: {share_url}", flush=True)
        command = server_commands.wait(lambda: demo.is_running)  # None: Ctrl+C or SIGTERM
        log.info("%s: closing the web server.", {"stop": "Stopping", "restart": "Restarting"}.get(command, "Stopping"))
        # the jobs still queued or running end first (503: shutting down), so their requests are answered while the
        # web server still serves; then it closes (it lets answers in progress finish)
        service.stop()
        demo.close()
        from gradio.tunneling import CURRENT_TUNNELS  # the share link's tunnel (what demo.block_thread closed)
        for tunnel in CURRENT_TUNNELS:
            tunnel.kill()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()  # again is harmless: the workers are gone already
    return RESTART_EXIT_CODE if command == "restart" else 0


if __name__ == "__main__":
    code = main()
    from api.server_routes import RESTART_EXIT_CODE, RESTARTS_IN_PLACE, restart_in_place
    if code == RESTART_EXIT_CODE and RESTARTS_IN_PLACE:  # /sdapi/v1/server-restart: start again, in place
        restart_in_place()
    sys.exit(code)  # on Windows launch.py, which runs app.py as a child there, starts it again
