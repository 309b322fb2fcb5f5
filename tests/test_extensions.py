"""Extensions without a server: discovery, preload.py flags, install.py once (gated under --listen), the
front-end files' path checks, install from a git URL and update checks against local git repositories."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.core import extensions as core_ext
from backend.core.cmd_args import parse_args
from backend.core.errors import UserError
from backend.core.options import Options
from backend.extensions import (ACCESS_DISABLED, ExtensionManager, asset_path, enabled_extensions, load_index,
                                name_from_url, page_head, run_installers)


def _ext(root: Path, name: str, files: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


@pytest.fixture
def program(tmp_path, monkeypatch):
    """A program folder of our own (extensions-builtin/, extensions/ with its placeholder) and a data dir."""
    prog = tmp_path / "program"
    (prog / "extensions").mkdir(parents=True)
    (prog / "extensions" / "Put extensions here.txt").write_text("")
    (prog / "extensions-builtin").mkdir()
    monkeypatch.setattr(core_ext, "PROGRAM_DIR", prog)
    data = tmp_path / "data"
    (data / "extensions").mkdir(parents=True)
    return SimpleNamespace(prog=prog, data=data)


def _git(*args, cwd=None):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


def _repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    _git("init", "-q", "-b", "main", cwd=path)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    _git("add", "-A", cwd=path)
    _git("commit", "-q", "-m", "first", cwd=path)
    return path


def _args(data: Path, *flags: str):
    return parse_args(["--data-dir", str(data), *flags])


def test_discovery_of_both_roots_builtin_and_disabled(program):
    _ext(program.prog / "extensions-builtin", "builtin-one", {"scripts/b.py": ""})
    _ext(program.prog / "extensions", "program-ext", {"scripts/a.py": "", "scripts/notes.txt": "",
                                                      "javascript/a.js": "", "style.css": "", "install.py": "",
                                                      "preload.py": ""})
    _ext(program.data / "extensions", "data-ext", {"javascript/z.js": ""})
    found = {e.name: e for e in core_ext.discover(program.data, ["data-ext"])}
    assert set(found) == {"builtin-one", "program-ext", "data-ext"}  # the placeholder file is no extension
    assert found["builtin-one"].is_builtin and not found["program-ext"].is_builtin
    p = found["program-ext"]
    assert [f.name for f in p.script_files] == ["a.py"]
    assert [f.name for f in p.javascript_files] == ["a.js"]
    assert p.style_file.name == "style.css" and p.install_script.name == "install.py"
    assert p.preload_script.name == "preload.py"
    assert found["data-ext"].enabled is False and found["program-ext"].enabled is True
    assert found["program-ext"].git.commit_hash == ""  # not a git checkout: empty fields

    paths = SimpleNamespace(data_dir=program.data)
    options = Options(None, program.data)
    options.update({"disabled_extensions": ["data-ext"]})
    assert [e.name for e in enabled_extensions(paths, options, _args(program.data))] == ["builtin-one", "program-ext"]
    assert enabled_extensions(paths, options, _args(program.data, "--disable-all-extensions")) == []
    assert [e.name for e in enabled_extensions(paths, options, _args(program.data, "--disable-extra-extensions"))] \
        == ["builtin-one"]
    # the data dir being the program folder: one root, not two
    assert len(core_ext.extension_roots(program.prog)) == 2


def test_disabled_list_passes_the_settings_gate(tmp_path):
    options = Options(tmp_path / "config.json", tmp_path)
    assert options.update({"disabled_extensions": ["a", "b", "a"]}) == {"disabled_extensions": ["a", "b"]}
    assert json.loads((tmp_path / "config.json").read_text())["disabled_extensions"] == ["a", "b"]
    for bad in ("a", ["../x"], ["a/b"], [3], [".."]):
        with pytest.raises(UserError, match="disabled_extensions"):
            options.update({"disabled_extensions": bad})
    frozen = Options(None, tmp_path, frozen=True)
    with pytest.raises(UserError, match="frozen"):
        frozen.update({"disabled_extensions": ["x"]})


def test_git_checkout_is_described(program):
    origin = _repo(program.prog / "origin-repo", {"scripts/s.py": ""})
    _git("clone", "-q", str(origin), str(program.data / "extensions" / "cloned"))
    ext = core_ext.discover(program.data)[0]
    assert ext.name == "cloned" and ext.git.remote == str(origin) and ext.git.branch == "main"
    assert len(ext.git.commit_hash) == 40 and ext.git.version == ext.git.commit_hash[:8] and ext.git.commit_date > 0


def test_preload_adds_a_flag_and_a_broken_preload_is_skipped(program, caplog):
    _ext(program.data / "extensions", "adds-flag", {
        "preload.py": "def preload(parser):\n    parser.add_argument('--my-extension-flag', default='x')\n"})
    _ext(program.data / "extensions", "broken", {"preload.py": "raise RuntimeError('boom in preload')\n"})
    with caplog.at_level(logging.ERROR, logger="easel.extensions"):
        args = parse_args(["--data-dir", str(program.data), "--my-extension-flag", "hello"])
    assert args.my_extension_flag == "hello" and args.unknown == []
    assert any("broken" in r.getMessage() and "boom in preload" in r.getMessage() for r in caplog.records)
    # --disable-all-extensions: no preload runs, the flag is unknown
    args = parse_args(["--data-dir", str(program.data), "--disable-all-extensions", "--my-extension-flag", "hello"])
    assert not hasattr(args, "my_extension_flag") and "--my-extension-flag" in args.unknown


INSTALL = "import pathlib\np = pathlib.Path('ran.txt')\np.write_text(p.read_text() + 'x' if p.exists() else 'x')\nprint('installing')\n"


def test_install_py_runs_once_and_again_when_changed(program, caplog):
    folder = _ext(program.data / "extensions", "needs-install", {"install.py": INSTALL})
    args = _args(program.data)
    with caplog.at_level(logging.INFO, logger="easel.extensions"):
        assert run_installers(sys.executable, args) == ["needs-install"]
    assert (folder / "ran.txt").read_text() == "x"
    assert any("installing" in r.getMessage() for r in caplog.records)  # its output is logged
    assert run_installers(sys.executable, args) == []  # once
    assert (folder / "ran.txt").read_text() == "x"
    (folder / "install.py").write_text(INSTALL + "# changed\n")
    assert run_installers(sys.executable, args) == ["needs-install"]
    assert (folder / "ran.txt").read_text() == "xx"
    # a disabled extension's install.py does not run
    (program.data / "config.json").write_text(json.dumps({"disabled_extensions": ["needs-install"]}))
    (folder / "install.py").write_text(INSTALL + "# changed again\n")
    assert run_installers(sys.executable, args) == []


def test_install_py_skipped_under_listen_unless_insecure_access(program, caplog):
    folder = _ext(program.data / "extensions", "needs-install", {"install.py": INSTALL})
    for flags in (["--listen"], ["--share"], ["--server-name", "example.org"]):
        with caplog.at_level(logging.WARNING, logger="easel.extensions"):
            assert run_installers(sys.executable, _args(program.data, *flags)) == []
        assert not (folder / "ran.txt").exists()
        assert "--enable-insecure-extension-access" in caplog.records[-1].getMessage()
        assert "needs-install" in caplog.records[-1].getMessage()
    assert run_installers(sys.executable, _args(program.data, "--listen", "--enable-insecure-extension-access")) \
        == ["needs-install"]
    assert (folder / "ran.txt").exists()


def test_front_end_files_stay_inside_the_extension(program, tmp_path):
    folder = _ext(program.data / "extensions", "front", {"javascript/a.js": "window.a = 1;", "style.css": "b{}",
                                                         "scripts/s.py": "SECRET", "javascript/notes.txt": "t"})
    (tmp_path / "outside.js").write_text("outside")
    (folder / "javascript" / "link.js").symlink_to(tmp_path / "outside.js")
    _ext(program.data / "extensions", "off", {"javascript/o.js": ""})
    options = Options(None, program.data)
    options.update({"disabled_extensions": ["off"]})
    exts = enabled_extensions(SimpleNamespace(data_dir=program.data), options)
    assert asset_path(exts, "front", "javascript/a.js").read_text() == "window.a = 1;"
    assert asset_path(exts, "front", "style.css").read_text() == "b{}"
    for name, rel in (("front", "../off/javascript/o.js"), ("front", "javascript/../../front/style.css"),
                      ("front", "javascript/link.js"), ("front", "scripts/s.py"), ("front", "/etc/passwd"),
                      ("front", "javascript/notes.txt"), ("off", "javascript/o.js"), ("nope", "a.js")):
        with pytest.raises(UserError) as err:
            asset_path(exts, name, rel)
        assert err.value.status == 404, (name, rel)
    head = page_head(exts)
    assert 'src="extension-assets/front/javascript/a.js"' in head and 'href="extension-assets/front/style.css"' in head
    assert "o.js" not in head  # a disabled extension's files are not in the page


def _manager(program, *flags):
    args = _args(program.data, *flags)
    return ExtensionManager(args, SimpleNamespace(data_dir=program.data), Options(None, program.data))


def test_install_from_url_refused_under_listen(program):
    origin = _repo(program.prog / "sd-webui-thing", {"scripts/s.py": ""})
    for flags in (["--listen"], ["--share"]):
        with pytest.raises(UserError) as err:
            _manager(program, *flags).install_from_url(origin.as_uri())
        assert err.value.message == ACCESS_DISABLED and err.value.status == 403
        with pytest.raises(UserError, match="extension access disabled"):
            _manager(program, *flags).check_updates()
    assert not (program.data / "extensions" / "sd-webui-thing").exists()


def test_install_from_a_local_git_url_then_check_updates(program):
    origin = _repo(program.prog / "sd-webui-thing.git", {"scripts/s.py": "", "javascript/t.js": ""})
    manager = _manager(program, "--listen", "--enable-insecure-extension-access")
    ext = manager.install_from_url(origin.as_uri())
    assert ext.name == "sd-webui-thing" and (program.data / "extensions" / "sd-webui-thing" / "scripts" / "s.py").is_file()
    listed = manager.api_list()
    assert listed == [{"name": "sd-webui-thing", "remote": origin.as_uri(), "branch": "main",
                       "commit_hash": ext.git.commit_hash, "version": ext.git.commit_hash[:8],
                       "commit_date": ext.git.commit_date, "enabled": True}]
    with pytest.raises(UserError, match="already exists"):
        manager.install_from_url(origin.as_uri())
    for bad_name in ("../escape", "a/b", ".."):
        with pytest.raises(UserError, match="folder name"):
            manager.install_from_url(origin.as_uri(), folder_name=bad_name)
    with pytest.raises(UserError, match="not a git URL"):
        manager.install_from_url("--upload-pack=touch /tmp/x")
    with pytest.raises(UserError, match="git clone of"):
        manager.install_from_url((program.prog / "no-such-repo").as_uri())

    assert manager.check_updates() == {"sd-webui-thing": "latest"}
    (origin / "new.txt").write_text("n")
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "second", cwd=origin)
    assert manager.check_updates() == {"sd-webui-thing": "behind (1 new commits)"}
    # the remote gone (offline): a clear message, not an error page
    _git("remote", "set-url", "origin", (program.prog / "gone").as_uri(), cwd=ext.path)
    status = manager.check_updates()["sd-webui-thing"]
    assert status.startswith("could not reach") and "gone" in status

    manager.set_enabled([])
    assert manager.api_list()[0]["enabled"] is False and manager.options["disabled_extensions"] == ["sd-webui-thing"]


def test_names_from_urls():
    assert name_from_url("https://github.com/someone/sd-webui-thing.git") == "sd-webui-thing"
    assert name_from_url("https://github.com/someone/sd-webui-thing/") == "sd-webui-thing"
    assert name_from_url("git@github.com:someone/thing.git") == "thing"


def test_available_index_offline_says_so():
    with pytest.raises(UserError) as err:
        load_index("http://127.0.0.1:9/index.json", timeout=5)
    assert "offline" in err.value.message and err.value.status == 503


def _commit(origin: Path, rel: str, text: str, message: str) -> str:
    (origin / rel).write_text(text)
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", message, cwd=origin)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin, capture_output=True, text=True).stdout.strip()


def _head(path: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()


def test_apply_updates_the_ticked_extensions_from_their_remote(program):
    """A1111's "Check for updates" then "Apply and restart UI" with the update ticked: the checkout moves to the
    remote's newest commit (fetch + reset --hard, as A1111's); an extension not ticked stays where it was."""
    origin = _repo(program.prog / "sd-webui-thing", {"scripts/s.py": "VERSION = 1\n"})
    other_origin = _repo(program.prog / "sd-webui-other", {"scripts/o.py": ""})
    manager = _manager(program)
    ext = manager.install_from_url(origin.as_uri())
    other = manager.install_from_url(other_origin.as_uri())
    old, other_old = ext.git.commit_hash, other.git.commit_hash
    new = _commit(origin, "scripts/s.py", "VERSION = 2\n", "second")
    _commit(other_origin, "scripts/o.py", "x = 1\n", "other second")
    (ext.path / "scripts" / "s.py").write_text("VERSION = 'edited by hand'\n")  # dropped by the update, as A1111's
    status = manager.check_updates()
    assert status == {"sd-webui-thing": "behind (1 new commits)", "sd-webui-other": "behind (1 new commits)"}
    assert _head(ext.path) == old  # checking changes nothing

    disabled, updated = manager.apply(["sd-webui-thing"], ["sd-webui-thing"], "none")
    assert updated == {"sd-webui-thing": f"updated to {new[:8]}"} and disabled == ["sd-webui-other"]
    assert _head(ext.path) == new and (ext.path / "scripts" / "s.py").read_text() == "VERSION = 2\n"
    assert _head(other.path) == other_old  # not ticked: not updated
    assert manager.check_updates()["sd-webui-thing"] == "latest"
    listed = {e["name"]: e for e in manager.api_list()}
    assert listed["sd-webui-thing"]["commit_hash"] == new and listed["sd-webui-other"]["enabled"] is False

    # the remote gone: that extension says so, the others still update
    _git("remote", "set-url", "origin", (program.prog / "gone").as_uri(), cwd=ext.path)
    result = manager.update(["sd-webui-thing", "sd-webui-other"])
    assert result["sd-webui-thing"].startswith("could not reach") and result["sd-webui-other"].startswith("updated to")
    assert _head(other.path) != other_old


def test_update_is_refused_under_listen_and_checks_names_first(program):
    origin = _repo(program.prog / "sd-webui-thing", {"scripts/s.py": ""})
    ext = _manager(program).install_from_url(origin.as_uri())
    _commit(origin, "new.txt", "n", "second")
    for flags in (["--listen"], ["--share"]):
        manager = _manager(program, *flags)
        for action in (lambda: manager.update(["sd-webui-thing"]),
                       lambda: manager.apply(["sd-webui-thing"], ["sd-webui-thing"], "none")):
            with pytest.raises(UserError) as err:
                action()
            assert err.value.message == ACCESS_DISABLED and err.value.status == 403
    assert _head(ext.path) == ext.git.commit_hash and not (ext.path / "new.txt").exists()
    manager = _manager(program, "--listen", "--enable-insecure-extension-access")
    with pytest.raises(UserError) as err:
        manager.update(["sd-webui-thing", "no-such-ext"])
    assert err.value.status == 404 and "no-such-ext" in err.value.message
    assert _head(ext.path) == ext.git.commit_hash  # nothing updated before the bad name was found
    # a bad "Disable all extensions" value: refused by the settings gate before anything is updated
    with pytest.raises(UserError, match="disable_all_extensions"):
        manager.apply(["sd-webui-thing"], ["sd-webui-thing"], "some")
    assert _head(ext.path) == ext.git.commit_hash
    assert manager.update(["sd-webui-thing"])["sd-webui-thing"].startswith("updated to")
    assert (ext.path / "new.txt").is_file()


def test_disable_all_extensions_setting(program):
    """A1111's "Disable all extensions" radio: stored through the settings gate with the list of disabled ones kept;
    from the next start "extra" runs only the built-in extensions, "all" none (scripts, install.py, preload.py)."""
    _ext(program.prog / "extensions-builtin", "builtin-one", {"scripts/b.py": ""})
    _ext(program.data / "extensions", "data-ext", {
        "install.py": INSTALL, "preload.py": "def preload(parser):\n    parser.add_argument('--data-ext-flag')\n"})
    _ext(program.data / "extensions", "off-ext", {"scripts/o.py": ""})
    config = program.data / "config.json"
    options = Options(config, program.data)
    manager = ExtensionManager(_args(program.data), SimpleNamespace(data_dir=program.data), options)
    assert [e.name for e in manager.enabled()] == ["builtin-one", "data-ext", "off-ext"]

    manager.apply(["builtin-one", "data-ext"], [], "extra")
    stored = json.loads(config.read_text())
    assert stored["disable_all_extensions"] == "extra" and stored["disabled_extensions"] == ["off-ext"]
    # "extra" is in effect after the restart: this server still has the extra extension it started with
    assert [e.name for e in manager.enabled()] == ["builtin-one", "data-ext"]
    restarted = Options(config, program.data)
    paths = SimpleNamespace(data_dir=program.data)
    assert [e.name for e in enabled_extensions(paths, restarted, _args(program.data))] == ["builtin-one"]
    assert [e.name for e in ExtensionManager(_args(program.data), paths, restarted).enabled()] == ["builtin-one"]
    assert run_installers(sys.executable, _args(program.data)) == []
    assert not hasattr(_args(program.data), "data_ext_flag")

    restarted.update({"disable_all_extensions": "all"})
    assert enabled_extensions(paths, Options(config, program.data), _args(program.data)) == []

    restarted.update({"disable_all_extensions": "none"})
    assert [e.name for e in enabled_extensions(paths, Options(config, program.data), _args(program.data))] \
        == ["builtin-one", "data-ext"]  # the disabled list was kept
    assert hasattr(_args(program.data), "data_ext_flag")
    assert run_installers(sys.executable, _args(program.data)) == ["data-ext"]

    for bad in ("some", 1, None, ["all"]):
        with pytest.raises(UserError, match="disable_all_extensions"):
            restarted.update({"disable_all_extensions": bad})


def test_preload_skips_disabled_extensions(program):
    _ext(program.data / "extensions", "off-ext", {
        "preload.py": "def preload(parser):\n    parser.add_argument('--off-ext-flag')\n"})
    assert hasattr(_args(program.data), "off_ext_flag")
    (program.data / "config.json").write_text(json.dumps({"disabled_extensions": ["off-ext"]}))
    assert not hasattr(_args(program.data), "off_ext_flag")  # A1111: disabled extensions' preloads do not run
