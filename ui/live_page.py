"""What a new page starts with: the fields that show server state (settings, model lists, which quick settings are
listed) are written into Gradio's page config just before a page (or its config) is served, instead of being sent
by page-load events.

Why not `demo.load`: Gradio's front-end keeps a loading status for every component that was ever the output of an
event, and on every status change of any event (each click's "pending", "complete") it rewrites all of them, each
with a walk of the whole component tree. Page-load events with the Settings tab's and the quick settings' ~300
fields made every later click of the page cost seconds of CPU (measured: opening an accordion 6 s on an idle
2-core machine, 0.8 s without them). Served in the config, the same values cost the page nothing.

`LivePage.on_page_load(fn, outputs)` takes what a `demo.load` would (`fn` returns a list: one value or
`gr.update(...)` per output); `middleware(app)` refreshes the config before `GET /` and `GET /config`, one page at a time, so a page gets
the fields and the Settings tab's snapshot of them (`settings_tab.SettingsTab.loaded`) from the same moment.
"""
from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

PAGE_PATHS = ("", "/", "/config", "/config/")


@dataclass
class LivePage:
    demo: gr.Blocks
    subpath: str = ""  # --subpath: the page's paths below it
    loaders: list[tuple[Callable[[], list], list]] = field(default_factory=list)

    def on_page_load(self, fn: Callable[[], Any], outputs: list) -> None:
        self.loaders.append((fn, list(outputs)))

    def refresh(self) -> None:
        """Write what each loader returns now into the page config (and into the components themselves, from which
        Gradio starts each new session's copy, so a choice added since server start is accepted)."""
        config = getattr(self.demo, "config", None)
        if not config:
            return
        entries = {entry["id"]: entry for entry in config["components"]}
        for fn, outputs in self.loaders:
            for component, value in zip(outputs, fn()):
                entry = entries.get(component._id)
                if entry is not None:
                    _apply(component, entry, value)

    def middleware(self, app):
        """ASGI middleware: refresh before Gradio copies the config for a page; held until the answer starts."""
        lock = asyncio.Lock()
        subpath = self.subpath.rstrip("/")

        async def guarded(scope, receive, send):
            if scope["type"] != "http" or scope.get("method") != "GET":
                return await app(scope, receive, send)
            path = scope.get("path", "")
            if subpath and path.startswith(subpath):
                path = path[len(subpath):]
            if path not in PAGE_PATHS:
                return await app(scope, receive, send)
            from starlette.concurrency import run_in_threadpool
            async with lock:
                await run_in_threadpool(self.refresh)
                started = asyncio.Event()

                async def send_started(message):
                    if message["type"] == "http.response.start":
                        started.set()
                    await send(message)

                task = asyncio.ensure_future(app(scope, receive, send_started))
                waiter = asyncio.ensure_future(started.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            await task

        return guarded


def _apply(component, entry: dict, value: Any) -> None:
    """Set the props an update names (or the value) on the config entry, as Gradio would serialise them."""
    if isinstance(value, dict) and value.get("__type__") == "update":
        changes = {k: v for k, v in value.items() if k != "__type__"}
    else:
        changes = {"value": value}
    if not changes:
        return
    with warnings.catch_warnings():  # a value not (yet) among the choices: Gradio warns, the page shows it as A1111
        warnings.simplefilter("ignore")
        fresh = component.__class__(**{**component.constructor_args, **changes, "render": False})
    props = fresh.get_config()
    new_props = dict(entry["props"])
    for key in changes:
        if key in props:
            new_props[key] = props[key]
        if hasattr(fresh, key):
            setattr(component, key, getattr(fresh, key))
    if getattr(component, "_constructor_args", None):  # what Gradio copies for a session's own updates
        component._constructor_args[0] = {**component._constructor_args[0], **changes}
    entry["props"] = new_props  # one assignment: a copy made meanwhile sees the old props or the new
