"""Extensions, app side: which run, their front-end files, and managing them (the Extensions tab, the API).

Discovery is `backend.core.extensions` (the launcher and the flag parser use it too). Here:

- `enabled_extensions(paths, options, args)`: the extensions that run, for the script loader
  (`Extension.script_files`) and the page (`page_head`: each one's `javascript/*.js` and `style.css`, served by
  `asset_path`, which keeps every request inside the extension's folder);
- `ExtensionManager`: the list in A1111's API shape, "Apply and restart UI" (the enabled checkboxes and "Disable
  all extensions" through the settings gate, the extensions ticked for update moved to their upstream's newest
  commit), checking for updates (`git fetch`), installing from a git URL, A1111's index of available extensions;
- `run_installers`: each enabled extension's `install.py`, run once by the launcher (again when the file changes).

Changing extensions (install, update) runs code from elsewhere on this machine: refused, as in A1111, when the
server is reachable from other machines (`--listen`, `--share`, `--server-name`) unless
`--enable-insecure-extension-access`. Standard library only.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from backend.core.errors import UserError
from backend.core.extensions import (Extension, active_extensions, disable_flags, discover, read_git_info,
                                     stored_choices)

log = logging.getLogger("easel.extensions")

ASSET_PREFIX = "extension-assets"  # URL path of the extensions' front-end files
ASSET_SUFFIXES = (".js", ".mjs", ".css", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".woff", ".woff2",
                  ".ttf", ".json", ".html")
INDEX_URL = "https://raw.githubusercontent.com/AUTOMATIC1111/stable-diffusion-webui-extensions/master/index.json"
ACCESS_DISABLED = ("extension access disabled because of command line flags (--listen, --share or --server-name "
                   "without --enable-insecure-extension-access)")
GIT_NETWORK_TIMEOUT_S = 120
INSTALL_TIMEOUT_S = 1800
INSTALLERS_RECORD = "extension_installers.json"
BEHIND = "behind"  # the start of check_updates' answer for an extension with new commits upstream


def extension_access_allowed(args) -> bool:
    """A1111's check: managing extensions is off when others can reach the server, unless explicitly allowed."""
    exposed = bool(getattr(args, "listen", False) or getattr(args, "share", False) or getattr(args, "server_name", None))
    return not exposed or bool(getattr(args, "enable_insecure_extension_access", False))


def all_extensions(data_dir, options, *, with_git: bool = True) -> list[Extension]:
    return discover(data_dir, options.get("disabled_extensions") or [], with_git=with_git)


def enabled_extensions(paths, options, args=None) -> list[Extension]:
    """The extensions that run (enabled, and allowed by --disable-all-extensions / --disable-extra-extensions and
    the setting `disable_all_extensions`)."""
    disable_all, disable_extra = disable_flags(args, options.get("disable_all_extensions"))
    return active_extensions(all_extensions(paths.data_dir, options, with_git=False),
                             disable_all=disable_all, disable_extra=disable_extra)


# ---- front-end files -------------------------------------------------------------------------------------------

def asset_url(ext: Extension, file: Path) -> str:
    """Relative to the page (so it works under --subpath too)."""
    rel = file.relative_to(ext.path).as_posix()
    return f"{ASSET_PREFIX}/{quote(ext.name)}/{quote(rel)}"


# The helpers A1111's page (script.js) gives extensions' scripts: gradioApp(), onUiLoaded, onUiUpdate,
# onAfterUiUpdate (callbacks run when the UI first appears, on each change of the page, and once changes settle).
A1111_SCRIPT_HELPERS = """<script>(() => {
  if (window.onUiLoaded) return;
  window.gradioApp = () => { const app = document.getElementsByTagName("gradio-app")[0];
    return app ? (app.shadowRoot || app) : document; };
  const loaded = [], updated = [], after = []; let isLoaded = false, timer = null;
  const run = (callbacks, arg) => callbacks.forEach((cb) => { try { cb(arg); } catch (e) { console.error(e); } });
  const checkLoaded = () => { if (!isLoaded && gradioApp().querySelector("#tabs")) { isLoaded = true; run(loaded); } };
  window.onUiLoaded = (cb) => { if (isLoaded) run([cb]); else loaded.push(cb); };  // late scripts still get it
  window.onUiUpdate = (cb) => updated.push(cb);
  window.onAfterUiUpdate = (cb) => after.push(cb);
  new MutationObserver((mutations) => {
    checkLoaded();
    run(updated, mutations);
    clearTimeout(timer); timer = setTimeout(() => run(after), 200);
  }).observe(document.documentElement, {childList: true, subtree: true});
  checkLoaded();
})();</script>"""


def page_head(extensions: list[Extension]) -> str:
    """<script>/<link> tags for the enabled extensions' `javascript/*.js` and `style.css` (A1111's order: scripts of
    each extension, then its style), after A1111's helpers for them."""
    tags = [A1111_SCRIPT_HELPERS] if any(e.javascript_files for e in extensions) else []
    for ext in extensions:
        for js in ext.javascript_files:
            tags.append(f'<script type="text/javascript" src="{html.escape(asset_url(ext, js))}"></script>')
        if ext.style_file is not None:
            tags.append(f'<link rel="stylesheet" property="stylesheet" href="{html.escape(asset_url(ext, ext.style_file))}">')
    return "\n".join(tags)


def asset_path(extensions: list[Extension], name: str, relative: str) -> Path:
    """The file `relative` of the enabled extension `name`, or a UserError (404). Only files inside the extension's
    folder (after following symlinks), never under `.git`, with a front-end suffix."""
    ext = next((e for e in extensions if e.name == name), None)
    if ext is None:
        raise UserError(f"No enabled extension named {name!r}.", status=404)
    parts = relative.replace("\\", "/").split("/")
    if not relative or relative.startswith("/") or ".." in parts or ".git" in parts or "\x00" in relative:
        raise UserError(f"Extension file {relative!r} is outside the extension's folder.", status=404)
    root = ext.path.resolve()
    target = (root / relative).resolve()
    if root not in target.parents:
        raise UserError(f"Extension file {relative!r} is outside the extension's folder.", status=404)
    if target.suffix.lower() not in ASSET_SUFFIXES or not target.is_file():
        raise UserError(f"Extension {name!r} has no file {relative!r} to serve.", status=404)
    return target


# ---- install.py ------------------------------------------------------------------------------------------------

def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_installers(python: str | Path, args, *, timeout: float = INSTALL_TIMEOUT_S) -> list[str]:
    """Run each enabled extension's `install.py` with `python` (the venv's), once: the file's hash is recorded in
    `DATA_DIR/cache/extension_installers.json` after it succeeded, and it runs again only when it changed.
    Under --listen/--share without --enable-insecure-extension-access nothing runs (logged). Returns the names run."""
    data_dir = Path(args.data_dir).expanduser().resolve()
    config = Path(args.ui_settings_file).expanduser() if getattr(args, "ui_settings_file", None) else data_dir / "config.json"
    disabled, mode = stored_choices(config)
    disable_all, disable_extra = disable_flags(args, mode)
    if disable_all:
        return []
    exts = active_extensions(discover(data_dir, disabled, with_git=False), disable_extra=disable_extra)
    pending = [e for e in exts if e.install_script is not None]
    if not pending:
        return []
    if not extension_access_allowed(args):
        log.warning("not running install.py of extensions %s: the server is reachable from other machines "
                    "(--listen/--share/--server-name); add --enable-insecure-extension-access to allow it",
                    ", ".join(e.name for e in pending))
        return []
    record_file = data_dir / "cache" / INSTALLERS_RECORD
    try:
        record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    except (OSError, ValueError):
        record = {}
    ran = []
    for ext in pending:
        script = ext.install_script
        key, digest = str(script.resolve()), _file_hash(script)
        if record.get(key) == digest:
            continue
        log.info("extension %s: running install.py", ext.name)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                           os.environ.get("PYTHONPATH", "")])))
        try:
            done = subprocess.run([str(python), str(script)], cwd=ext.path, capture_output=True, text=True,
                                  timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            log.error("extension %s: install.py did not finish within %g s; skipped", ext.name, timeout)
            continue
        except OSError as exc:
            log.error("extension %s: install.py could not run: %s", ext.name, exc)
            continue
        output = (done.stdout + done.stderr).strip()
        if output:
            log.info("extension %s: install.py output:\n%s", ext.name, output)
        ran.append(ext.name)
        if done.returncode != 0:
            log.error("extension %s: install.py failed (exit status %d); it runs again next start",
                      ext.name, done.returncode)
            continue
        record[key] = digest
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return ran


# ---- managing extensions ---------------------------------------------------------------------------------------

_URL_NAME = re.compile(r"[^/\\:]+$")


def name_from_url(url: str) -> str:
    """A1111's folder name for a git URL: its last path part without `.git`."""
    stripped = url.strip().rstrip("/\\")
    match = _URL_NAME.search(stripped)
    name = match.group(0) if match else ""
    return name[:-4] if name.endswith(".git") else name


def check_folder_name(name: str) -> str:
    name = name.strip()
    if not name or name in (".", "..") or any(c in name for c in "/\\") or ".." in name or name.startswith(".") \
            or any(ord(c) < 32 for c in name):
        raise UserError(f"{name!r} cannot be an extension's folder name (no path separators, no '..').")
    return name


def _git_run(args: list[str], cwd: Path | None = None, timeout: float = GIT_NETWORK_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # never wait for a password
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UserError("git is not installed on the server; it is needed to install and update extensions.",
                        status=500) from None
    except subprocess.TimeoutExpired:
        raise UserError(f"git {args[0]} did not finish within {timeout:g} s (is the network reachable?).",
                        status=504) from None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class ExtensionManager:
    """The Extensions tab's and the API's view of the extensions, and the actions on them."""

    def __init__(self, args, paths, options):
        self.args = args
        self.paths = paths
        self.options = options
        # "Disable all extensions" as the server started with it (a change applies at the next start)
        self.disable_all_at_start = options["disable_all_extensions"]

    @property
    def install_dir(self) -> Path:
        """Where "Install from URL" clones to: DATA_DIR/extensions (A1111's extensions_dir)."""
        return Path(self.paths.data_dir) / "extensions"

    def list(self) -> list[Extension]:
        return all_extensions(self.paths.data_dir, self.options)

    def enabled(self) -> list[Extension]:
        """The extensions running since the server started."""
        disable_all, disable_extra = disable_flags(self.args, self.disable_all_at_start)
        return active_extensions(all_extensions(self.paths.data_dir, self.options, with_git=False),
                                 disable_all=disable_all, disable_extra=disable_extra)

    def log_state(self) -> None:
        """At start: which extensions run, and the flags that turned them off (as A1111 prints them)."""
        if getattr(self.args, "disable_all_extensions", False):
            log.warning("--disable-all-extensions is on: no extension is loaded")
        elif self.disable_all_at_start == "all":
            log.warning('"Disable all extensions" is set to all: no extension is loaded')
        elif getattr(self.args, "disable_extra_extensions", False):
            log.warning("--disable-extra-extensions is on: only built-in extensions are loaded")
        elif self.disable_all_at_start == "extra":
            log.warning('"Disable all extensions" is set to extra: only built-in extensions are loaded')
        names = [e.name for e in self.enabled()]
        if names:
            log.info("extensions: %s", ", ".join(names))

    def api_list(self) -> list[dict]:
        """GET /sdapi/v1/extensions, as A1111's: the built-in extensions (extensions-builtin/, part of the program's
        own checkout, with no remote of their own) are not listed; the Extensions tab shows them."""
        return [{"name": e.name, "remote": e.git.remote, "branch": e.git.branch, "commit_hash": e.git.commit_hash,
                 "version": e.git.version, "commit_date": e.git.commit_date, "enabled": e.enabled}
                for e in self.list() if not e.is_builtin]

    def set_enabled(self, enabled_names: list[str]) -> list[str]:
        """Store the extensions not in `enabled_names` as disabled (through the settings gate); returns that list.
        They take effect at the next start (Apply and restart)."""
        names = [e.name for e in self.list()]
        disabled = [n for n in names if n not in set(enabled_names)]
        self.options.update({"disabled_extensions": disabled})
        return disabled

    def check_access(self) -> None:
        if not extension_access_allowed(self.args):
            raise UserError(ACCESS_DISABLED, status=403)

    def check_updates(self) -> dict[str, str]:
        """`git fetch` each git extension and compare with its upstream: name -> "latest", "behind" or a message
        (no remote, unreachable)."""
        self.check_access()
        status = {}
        for ext in self.list():
            if not ext.git.commit_hash:
                status[ext.name] = "not a git checkout"
                continue
            done = _git_run(["fetch", "--quiet"], cwd=ext.path)
            if done.returncode != 0:
                status[ext.name] = f"could not reach {ext.git.remote or 'its remote'}: {_last_line(done.stderr)}"
                continue
            upstream = _git_run(["rev-parse", "@{u}"], cwd=ext.path, timeout=10)
            if upstream.returncode != 0:
                status[ext.name] = "no upstream branch to compare with"
                continue
            behind = _git_run(["rev-list", "--count", "HEAD..@{u}"], cwd=ext.path, timeout=10).stdout.strip()
            status[ext.name] = "latest" if behind in ("", "0") else f"{BEHIND} ({behind} new commits)"
        return status

    def update(self, names: list[str]) -> dict[str, str]:
        """Update the extensions `names` as A1111's "Apply and restart UI" updates the ones ticked after "Check for
        updates": `git fetch`, then the checkout reset to its upstream branch's newest commit (`git reset --hard`,
        as A1111's fetch_and_reset_hard: changes made to the extension's files by hand are dropped). Every name is
        checked before anything changes. name -> "updated to <version>", or why it was not (the others go on)."""
        self.check_access()
        by_name = {e.name: e for e in self.list()}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise UserError(f"No extension named {', '.join(map(repr, unknown))} to update.", status=404)
        results = {}
        for name in dict.fromkeys(names):
            ext = by_name[name]
            if not ext.git.commit_hash:
                results[name] = "not a git checkout: nothing to update"
                continue
            done = _git_run(["fetch", "--quiet"], cwd=ext.path)
            if done.returncode != 0:
                results[name] = f"could not reach {ext.git.remote or 'its remote'}: {_last_line(done.stderr)}"
                continue
            done = _git_run(["reset", "--hard", "--quiet", "@{u}"], cwd=ext.path, timeout=60)
            if done.returncode != 0:
                results[name] = f"could not be updated: {_last_line(done.stderr)}"
                continue
            version = read_git_info(ext.path).version
            log.info("extension %s updated to %s", name, version)
            results[name] = f"updated to {version}"
        return results

    def apply(self, enabled_names: list[str], update_names: list[str] = (),
              disable_all: str = "none") -> tuple[list[str], dict[str, str]]:
        """A1111's "Apply and restart UI" before the restart: the extensions ticked for update are updated, the
        ones not in `enabled_names` stored as disabled and "Disable all extensions" (none, extra, all) stored,
        both through the settings gate (checked before anything changes). Refused, like installing, when the
        server is reachable from other machines without --enable-insecure-extension-access.
        Returns (the disabled names, the update results)."""
        self.check_access()
        names = [e.name for e in self.list()]
        chosen = set(enabled_names)
        changes = {"disabled_extensions": [n for n in names if n not in chosen], "disable_all_extensions": disable_all}
        self.options.check(changes)
        updated = self.update(list(update_names)) if update_names else {}
        self.options.update(changes)
        return changes["disabled_extensions"], updated

    def install_from_url(self, url: str, branch: str = "", folder_name: str = "") -> Extension:
        """git clone `url` into DATA_DIR/extensions/<name> (A1111: the name from the URL unless given)."""
        self.check_access()
        url = (url or "").strip()
        if not url:
            raise UserError("No URL specified.")
        if url.startswith("-") or any(ord(c) < 32 for c in url):
            raise UserError(f"{url!r} is not a git URL.")
        name = check_folder_name(folder_name or name_from_url(url))
        target = self.install_dir / name
        if target.exists():
            raise UserError(f"Extension directory already exists: {target}", status=409)
        self.install_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.install_dir, prefix=".clone-") as tmp:
            cmd = ["clone", "--quiet", *(["--branch", branch.strip()] if branch and branch.strip() else []),
                   "--", url, str(Path(tmp) / name)]
            done = _git_run(cmd)
            if done.returncode != 0:
                raise UserError(f"git clone of {url} failed: {_last_line(done.stderr)}", status=400)
            shutil.move(str(Path(tmp) / name), str(target))
        log.info("installed extension %s from %s into %s", name, url, target)
        return Extension(name=name, path=target, enabled=name not in (self.options.get("disabled_extensions") or []),
                         git=read_git_info(target))


def load_index(url: str = INDEX_URL, timeout: float = 10) -> list[dict]:
    """A1111's index of available extensions, or a UserError saying it cannot be reached (offline)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read(20 * 2**20).decode("utf-8"))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"The list of available extensions cannot be loaded: the server is offline or cannot reach "
                        f"{url} ({reason}).", status=503) from None
    except ValueError as exc:
        raise UserError(f"The list of available extensions at {url} is not valid JSON ({exc}).", status=502) from None
    items = data.get("extensions", []) if isinstance(data, dict) else []
    return [i for i in items if isinstance(i, dict)]


def restart_program(service) -> None:
    """Restart the app as A1111's "Apply and restart UI": stop the backend process, then replace this process
    with a fresh one with the same command line (same pid; the listening socket closes on exec)."""
    log.info("restarting to apply the extension changes")
    try:
        service.stop()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
