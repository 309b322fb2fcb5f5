"""AUTOMATIC1111's server commands: `POST /sdapi/v1/server-kill`, `/server-restart`, `/server-stop`, which exist only
with `--api-server-stop` (without it they are 404, as in A1111).

- kill: the backend process is killed and the app exits at once (exit code 0), as A1111's `os._exit(0)`; the
  request is answered first.
- stop: the web server closes, the backend process stops, the app exits with code 0 (A1111's "Stopping.").
- restart: the same clean shutdown, then the app starts again with the same command line: `app.py` re-executes
  itself in place on POSIX (same process id, so a service manager or the launcher that exec'ed it keeps
  tracking it); elsewhere it exits with `RESTART_EXIT_CODE` and `launch.py`, which runs it as a child there,
  starts it again.

The routes only post the command; the app's main thread waits for it (`ServerCommands.wait`) and shuts down,
because the web server cannot close itself from one of its own requests.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from fastapi import APIRouter, BackgroundTasks
from fastapi.responses import PlainTextResponse

from backend.core.cmd_args import RESTART_EXIT_CODE  # noqa: F401 (app.py's exit code asking launch.py to restart it)

RESTARTS_IN_PLACE = os.name == "posix"  # app.py re-executes itself; launch.py exec'ed it (launch.hand_over)


class ServerCommands:
    """The command (stop or restart) the API has posted for the app's main thread."""

    def __init__(self) -> None:
        self._posted = threading.Event()
        self._command: str | None = None

    def post(self, command: str) -> None:
        if command not in ("stop", "restart"):
            raise ValueError(command)
        if not self._posted.is_set():  # the first command wins
            self._command = command
            self._posted.set()

    def wait(self, still_running: Callable[[], bool] = lambda: True) -> str | None:
        """Block until a command is posted (-> "stop" / "restart"), the server stops running, or Ctrl+C / SIGTERM
        (-> None)."""
        try:
            while still_running():
                if self._posted.wait(0.1):
                    return self._command
        except KeyboardInterrupt:
            pass
        return None


def build_server_control_router(commands: ServerCommands, kill_backend: Callable[[], None],
                                dependencies: list | None = None, route_class=None) -> APIRouter:
    """The three routes (mounted only with --api-server-stop). `kill_backend` ends the backend process at once."""
    router = APIRouter(prefix="/sdapi/v1", dependencies=dependencies or [],
                       **({"route_class": route_class} if route_class else {}))

    def exit_now() -> None:
        kill_backend()
        os._exit(0)

    @router.post("/server-kill")
    def server_kill(background: BackgroundTasks) -> PlainTextResponse:
        background.add_task(exit_now)  # runs once the answer is sent
        return PlainTextResponse("Killing.")

    @router.post("/server-restart")
    def server_restart() -> PlainTextResponse:
        commands.post("restart")
        return PlainTextResponse("Restarting.")

    @router.post("/server-stop")
    def server_stop() -> PlainTextResponse:
        commands.post("stop")
        return PlainTextResponse("Stopping.")

    return router


def restart_in_place() -> None:
    """Replace this process with a fresh run of the same command line (POSIX exec: same pid, same stdio)."""
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
