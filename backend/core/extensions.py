"""Extensions on disk, found as AUTOMATIC1111 finds them (standard library only: the launcher imports it).

Every folder in `<program>/extensions-builtin/` (built-in), `<program>/extensions/` and, when `--data-dir` names
another folder, `DATA_DIR/extensions` is an extension; files (the "Put extensions here" note) are not. What an
extension holds: `scripts/*.py`, `javascript/*.js`, `style.css`, `install.py` (run once by the launcher),
`preload.py` (`preload(parser)` adds command-line flags before they are parsed). A git checkout also has its
remote, branch and commit, read with `git` (absent git or a broken checkout: empty fields).

Which extensions run: all that are not in the `disabled_extensions` setting; none with `--disable-all-extensions`
or the setting `disable_all_extensions` "all" (the Extensions tab's "Disable all extensions" radio, which keeps the
list of disabled ones); only the built-in ones with `--disable-extra-extensions` or that setting "extra"
(`active_extensions`, `disable_flags`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("easel.extensions")

PROGRAM_DIR = Path(__file__).resolve().parents[2]  # the folder holding app.py
GIT_TIMEOUT_S = 10


@dataclass(frozen=True)
class GitInfo:
    remote: str = ""
    branch: str = ""
    commit_hash: str = ""
    commit_date: int = 0  # seconds since the epoch, as A1111's API returns it

    @property
    def version(self) -> str:
        return self.commit_hash[:8]


@dataclass(frozen=True)
class Extension:
    name: str
    path: Path
    is_builtin: bool = False
    enabled: bool = True
    git: GitInfo = field(default_factory=GitInfo)

    def _files(self, folder: str, suffix: str) -> list[Path]:
        d = self.path / folder
        return sorted(p for p in d.glob(f"*{suffix}") if p.is_file()) if d.is_dir() else []

    @property
    def script_files(self) -> list[Path]:
        return self._files("scripts", ".py")

    @property
    def javascript_files(self) -> list[Path]:
        return self._files("javascript", ".js")

    def _own_file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    @property
    def style_file(self) -> Path | None:
        return self._own_file("style.css")

    @property
    def install_script(self) -> Path | None:
        return self._own_file("install.py")

    @property
    def preload_script(self) -> Path | None:
        return self._own_file("preload.py")


def extension_roots(data_dir: str | Path | None) -> list[tuple[Path, bool]]:
    """The folders holding extensions, each with whether its extensions are built-in."""
    roots = [(PROGRAM_DIR / "extensions-builtin", True), (PROGRAM_DIR / "extensions", False)]
    if data_dir is not None:
        extra = Path(data_dir).expanduser().resolve() / "extensions"
        if extra.resolve() not in [r.resolve() for r, _ in roots]:
            roots.append((extra, False))
    return roots


def _git(path: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def read_git_info(path: Path) -> GitInfo:
    """Remote URL, branch, commit and its date of a git checkout; empty fields when it is none or git is absent."""
    if not (path / ".git").exists():
        return GitInfo()
    head = _git(path, "log", "-1", "--format=%H %ct").split()
    branch = _git(path, "rev-parse", "--abbrev-ref", "HEAD")
    return GitInfo(remote=_git(path, "config", "--get", "remote.origin.url"),
                   branch="" if branch == "HEAD" else branch,
                   commit_hash=head[0] if head else "",
                   commit_date=int(head[1]) if len(head) > 1 and head[1].isdigit() else 0)


def discover(data_dir: str | Path | None, disabled: list[str] | tuple = (), *, with_git: bool = True) -> list[Extension]:
    """Every extension folder of every root (built-in first), with its enabled state from `disabled`.
    A name found twice keeps its first folder (A1111 lists both; the later one would shadow nothing useful)."""
    found: list[Extension] = []
    seen: set[str] = set()
    off = set(disabled)
    for root, builtin in extension_roots(data_dir):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            if not folder.is_dir() or folder.name.startswith(".") or folder.name in seen:
                continue
            seen.add(folder.name)
            found.append(Extension(name=folder.name, path=folder, is_builtin=builtin, enabled=folder.name not in off,
                                   git=read_git_info(folder) if with_git else GitInfo()))
    return found


def active_extensions(extensions: list[Extension], *, disable_all: bool = False,
                      disable_extra: bool = False) -> list[Extension]:
    """The extensions that run: enabled ones; none with --disable-all-extensions; only built-in ones with
    --disable-extra-extensions."""
    if disable_all:
        return []
    return [e for e in extensions if e.enabled and (e.is_builtin or not disable_extra)]


DISABLE_ALL_CHOICES = ("none", "extra", "all")  # A1111's "Disable all extensions" radio


def disable_flags(args, disable_all_setting: str | None) -> tuple[bool, bool]:
    """(no extension runs, only built-in ones run) from the flags and the `disable_all_extensions` setting."""
    setting = disable_all_setting if disable_all_setting in DISABLE_ALL_CHOICES else DISABLE_ALL_CHOICES[0]
    disable_all = bool(getattr(args, "disable_all_extensions", False)) or setting == "all"
    disable_extra = bool(getattr(args, "disable_extra_extensions", False)) or setting == "extra"
    return disable_all, disable_extra


def stored_choices(settings_file: str | Path | None) -> tuple[list[str], str]:
    """(`disabled_extensions`, `disable_all_extensions`) as the settings file holds them, for the launcher and the
    flag parser, which run before the settings are loaded; a missing or unreadable file: ([], "none")."""
    try:
        stored = json.loads(Path(settings_file).read_text(encoding="utf-8")) if settings_file else {}
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    disabled = stored.get("disabled_extensions", [])
    disabled = [d for d in disabled if isinstance(d, str)] if isinstance(disabled, list) else []
    mode = stored.get("disable_all_extensions")  # absent or not one of the choices: the first, "none"
    return disabled, mode if mode in DISABLE_ALL_CHOICES else DISABLE_ALL_CHOICES[0]


def run_preloads(parser, data_dir: str | Path | None, *, disable_all: bool = False,
                 disable_extra: bool = False, settings_file: str | Path | None = None) -> list[str]:
    """Call each running extension's `preload(parser)` (A1111: before the flags are parsed, so an extension adds its
    own); `settings_file`: where the disabled extensions and "Disable all extensions" are stored. An extension whose
    preload fails is logged with its name and skipped. Returns the names whose preload ran."""
    disabled, mode = stored_choices(settings_file)
    setting_all, setting_extra = disable_flags(None, mode)
    if disable_all or setting_all:
        return []
    ran = []
    for ext in active_extensions(discover(data_dir, disabled, with_git=False),
                                 disable_extra=disable_extra or setting_extra):
        script = ext.preload_script
        if script is None:
            continue
        try:
            spec = importlib.util.spec_from_file_location(f"easel_extension_preload_{ext.name}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            preload = getattr(module, "preload", None)
            if preload is not None:
                preload(parser)
            ran.append(ext.name)
        except Exception as exc:  # an extension's code: any error is its own, the program goes on
            log.error("extension %s: preload.py failed, skipped: %s: %s", ext.name, type(exc).__name__, exc)
    return ran
