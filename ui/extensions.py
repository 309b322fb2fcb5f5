"""The Extensions tab, as AUTOMATIC1111's: Installed (the table, enable/disable, "Disable all extensions", Check for
updates, then Apply and restart UI, which also updates the extensions ticked for update), Available (A1111's index,
when the server is online), Install from URL."""
from __future__ import annotations

import html
import threading
import time

import gradio as gr

from backend.core.errors import UserError
from backend.core.extensions import DISABLE_ALL_CHOICES
from backend.extensions import (ACCESS_DISABLED, BEHIND, INDEX_URL, extension_access_allowed, load_index,
                                restart_program)
from backend.service import EaselService

RESTARTING = "Restarting the server"
RESTART_DELAY_S = 1.0  # lets the answer reach the browser before the process is replaced

# After "Apply and restart UI": wait until the server has gone away and answers again, then reload the page.
RELOAD_WHEN_BACK_JS = """
async () => {
    const url = window.location.href;
    const answers = async () => { try { return (await fetch(url, {cache: "no-store"})).ok; } catch (e) { return false; } };
    const pause = (ms) => new Promise((r) => setTimeout(r, ms));
    const start = Date.now();
    while (await answers() && Date.now() - start < 30000) await pause(250);
    while (!(await answers()) && Date.now() - start < 600000) await pause(500);
    window.location.reload();
}
"""


def _date(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) if seconds else ""


def _error(message: str) -> str:
    return f'<div class="easel-error">{html.escape(message)}</div>'


def installed_table(service: EaselService, updates: dict[str, str] | None = None) -> str:
    exts = service.extensions.list()
    if not exts:
        return "<p>No extensions installed. Put extension folders in <code>extensions/</code>.</p>"
    rows = []
    for e in exts:
        remote = html.escape(e.git.remote)
        link = f'<a href="{remote}" target="_blank" rel="noopener">{remote}</a>' if e.git.remote.startswith(("http://", "https://")) else remote
        status = (updates or {}).get(e.name, "")
        rows.append(f'<tr data-extension="{html.escape(e.name)}"><td>{html.escape(e.name)}'
                    f'{" (built-in)" if e.is_builtin else ""}</td><td>{link}</td><td>{html.escape(e.git.branch)}</td>'
                    f'<td>{html.escape(e.git.version)}</td><td>{_date(e.git.commit_date)}</td>'
                    f'<td>{"enabled" if e.enabled else "disabled"}</td><td>{html.escape(status)}</td></tr>')
    return ('<table class="easel-extensions"><thead><tr><th>Extension</th><th>URL</th><th>Branch</th><th>Version</th>'
            '<th>Date</th><th>State</th><th>Update</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _flags_note(service: EaselService) -> str:
    args, started = service.args, service.extensions.disable_all_at_start
    if getattr(args, "disable_all_extensions", False):
        return "<p><b>--disable-all-extensions</b> is on: no extension runs.</p>"
    if started == "all":
        return '<p><b>"Disable all extensions"</b> is set to <i>all</i>: no extension runs.</p>'
    if getattr(args, "disable_extra_extensions", False):
        return "<p><b>--disable-extra-extensions</b> is on: only built-in extensions run.</p>"
    if started == "extra":
        return '<p><b>"Disable all extensions"</b> is set to <i>extra</i>: only built-in extensions run.</p>'
    return ""


def available_table(items: list[dict], installed: set[str]) -> str:
    rows = []
    for item in items:
        url = str(item.get("url", ""))
        name = str(item.get("name", "")) or url
        tags = ", ".join(str(t) for t in item.get("tags", []) if isinstance(t, str)) if isinstance(item.get("tags"), list) else ""
        state = "installed" if url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1] in installed else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(url)}</td>"
                    f"<td>{html.escape(str(item.get('description', '')))}</td><td>{html.escape(tags)}</td>"
                    f"<td>{state}</td></tr>")
    return ('<table class="easel-extensions"><thead><tr><th>Extension</th><th>URL</th><th>Description</th><th>Tags</th>'
            f'<th></th></tr></thead><tbody>{"".join(rows)}</tbody></table><p>{len(items)} extensions.</p>')


def build(service: EaselService):
    """Lay out the tab; returns (the page-load refresh, its outputs)."""
    names = [e.name for e in service.extensions.list()]
    access = extension_access_allowed(service.args)
    if not access:
        gr.HTML(_error(ACCESS_DISABLED), elem_id="extensions_access_disabled")
    with gr.Tabs(elem_id="extensions_tabs"):
        with gr.Tab("Installed", id="extensions_installed"):
            gr.HTML(_flags_note(service))
            with gr.Row():
                apply = gr.Button("Apply and restart UI", variant="primary", elem_id="extensions_apply")
                check = gr.Button("Check for updates", elem_id="extensions_check_updates")
                disable_all = gr.Radio(list(DISABLE_ALL_CHOICES), value=service.options["disable_all_extensions"],
                                       label="Disable all extensions", elem_id="extensions_disable_all")
            enabled = gr.CheckboxGroup(names, value=[e.name for e in service.extensions.list() if e.enabled],
                                       label="Enabled extensions", elem_id="extensions_enabled")
            # filled by "Check for updates" with the extensions that have new commits, ticked (as A1111's)
            updates = gr.CheckboxGroup([], value=[], label="Update with Apply and restart UI (after Check for updates)",
                                       elem_id="extensions_update")
            message = gr.HTML(elem_id="extensions_message")
            table = gr.HTML(installed_table(service), elem_id="extensions_table")
        with gr.Tab("Available", id="extensions_available"):
            with gr.Row():
                index_url = gr.Textbox(INDEX_URL, label="Extension index URL", elem_id="extensions_index_url", scale=4)
                load = gr.Button("Load from:", elem_id="extensions_load_available", scale=1)
            available = gr.HTML(elem_id="extensions_available_list")
        with gr.Tab("Install from URL", id="extensions_install"):
            url = gr.Textbox(label="URL for extension's git repository", elem_id="extensions_install_url")
            branch = gr.Textbox(label="Specific branch name (leave empty for the default)", elem_id="extensions_install_branch")
            folder = gr.Textbox(label="Local directory name (leave empty for the name from the URL)",
                                elem_id="extensions_install_dirname")
            install = gr.Button("Install", variant="primary", elem_id="extensions_install_button")
            install_result = gr.HTML(elem_id="extensions_install_result")

    def on_page_load():
        exts = service.extensions.list()
        return (gr.update(choices=[e.name for e in exts], value=[e.name for e in exts if e.enabled]),
                installed_table(service), service.options["disable_all_extensions"])

    def on_apply(chosen: list[str], to_update: list[str], mode: str):
        try:
            disabled, updated = service.extensions.apply(list(chosen or []), list(to_update or []), mode)
        except UserError as exc:
            return _error(exc.message), installed_table(service)
        threading.Timer(RESTART_DELAY_S, restart_program, args=(service,)).start()
        note = f"disabled: {', '.join(disabled)}" if disabled else "all extensions enabled"
        if mode != "none":
            note += f"; disable all extensions: {mode}"
        note += "".join(f"; {name} {result}" for name, result in updated.items())
        return html.escape(f"Saved ({note}). {RESTARTING}; the page reloads when it is back."), installed_table(service)

    def on_check():
        try:
            status = service.extensions.check_updates()
        except UserError as exc:
            return _error(exc.message), installed_table(service), gr.update()
        behind = [name for name, state in status.items() if state.startswith(BEHIND)]
        return ("Checked for updates." + (" Tick the ones to update, then Apply and restart UI." if behind else ""),
                installed_table(service, status), gr.update(choices=behind, value=behind))

    def on_load_available(index: str):
        try:
            items = load_index(index.strip() or INDEX_URL)
        except UserError as exc:
            return _error(exc.message)
        return available_table(items, {e.name for e in service.extensions.list()})

    def on_install(repo_url: str, branch_name: str, dirname: str):
        try:
            ext = service.extensions.install_from_url(repo_url, branch_name, dirname)
        except UserError as exc:
            return _error(exc.message), gr.update(), installed_table(service)
        exts = service.extensions.list()
        msg = html.escape(f"Installed into {ext.path}. Use the Installed tab to restart.")
        return (msg, gr.update(choices=[e.name for e in exts], value=[e.name for e in exts if e.enabled]),
                installed_table(service))

    # (a State's value never reaches the browser: the message itself says whether the server restarts)
    apply.click(on_apply, inputs=[enabled, updates, disable_all], outputs=[message, table]).then(
        None, inputs=[message], js=f"(msg) => {{ if (String(msg).includes({RESTARTING!r})) ({RELOAD_WHEN_BACK_JS})(); }}")
    check.click(on_check, outputs=[message, table, updates])
    load.click(on_load_available, inputs=[index_url], outputs=[available])
    install.click(on_install, inputs=[url, branch, folder], outputs=[install_result, enabled, table])
    return on_page_load, [enabled, table, disable_all]
