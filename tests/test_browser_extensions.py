"""Extensions in a running server: GET /sdapi/v1/extensions, the enabled extensions' JS and CSS served (and nothing
outside their folders) and run in the page, and the Extensions tab: the table, then disabling one extension and
enabling another with "Apply and restart UI" (the server restarts and the reloaded page runs the other's script)."""
from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from browser import browser_page
from conftest import Server

MARK_JS = """
window.easelTestExtension = "loaded";
const addMark = () => {
    const mark = document.createElement("div");
    mark.id = "easel-test-ext-mark";
    mark.textContent = "test extension";
    document.body.appendChild(mark);
};
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", addMark); else addMark();
onUiLoaded(() => { window.easelUiLoaded = Boolean(gradioApp().querySelector("#tabs")); });  // A1111's helpers
"""


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


@pytest.fixture(scope="module")
def ext_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext-origin")
    origin = root / "easel-test-ext"
    (origin / "javascript").mkdir(parents=True)
    (origin / "javascript" / "mark.js").write_text(MARK_JS)
    (origin / "style.css").write_text("#easel-test-ext-mark { color: rgb(1, 2, 3); }\n")
    _git("init", "-q", "-b", "main", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "first", cwd=origin)
    data = tmp_path_factory.mktemp("ext-data")
    (data / "extensions").mkdir()
    _git("clone", "-q", str(origin), str(data / "extensions" / "easel-test-ext"), cwd=data)
    other = data / "extensions" / "other-ext" / "javascript"
    other.mkdir(parents=True)
    (other / "o.js").write_text("window.easelOtherExtension = 1;\n")
    (data / "config.json").write_text(json.dumps({"disabled_extensions": ["other-ext"]}))
    with Server(data) as srv:
        srv.origin = origin
        yield srv


def test_api_lists_extensions_as_a1111(ext_server):
    listed = httpx.get(ext_server.url + "/sdapi/v1/extensions", timeout=30).json()
    by_name = {e["name"]: e for e in listed}
    assert set(by_name) == {"easel-test-ext", "other-ext"}
    for entry in listed:
        assert set(entry) == {"name", "remote", "branch", "commit_hash", "version", "commit_date", "enabled"}
    test_ext = by_name["easel-test-ext"]
    assert test_ext["enabled"] is True and test_ext["remote"] == str(ext_server.origin) and test_ext["branch"] == "main"
    assert len(test_ext["commit_hash"]) == 40 and test_ext["version"] == test_ext["commit_hash"][:8]
    assert isinstance(test_ext["commit_date"], int) and test_ext["commit_date"] > 0
    assert by_name["other-ext"]["enabled"] is False and by_name["other-ext"]["commit_hash"] == ""


def test_front_end_files_served_only_from_enabled_extensions(ext_server):
    base = ext_server.url + "/extension-assets/"
    js = httpx.get(base + "easel-test-ext/javascript/mark.js", timeout=30)
    assert js.status_code == 200 and "easelTestExtension" in js.text and "javascript" in js.headers["content-type"]
    assert httpx.get(base + "easel-test-ext/style.css", timeout=30).text.startswith("#easel-test-ext-mark")
    for path in ("easel-test-ext/%2e%2e/other-ext/javascript/o.js", "easel-test-ext/..%2fother-ext%2fjavascript%2fo.js",
                 "easel-test-ext/.git/config", "other-ext/javascript/o.js", "easel-test-ext/javascript/none.js"):
        answer = httpx.get(base + path, timeout=30)
        assert answer.status_code == 404, path
        assert "o.js" not in answer.text or "window" not in answer.text


def test_extensions_tab_shows_and_toggles_extensions(ext_server):
    with browser_page(ext_server.url) as page:
        page.wait_for_function("window.easelTestExtension === 'loaded'")
        page.wait_for_selector("#easel-test-ext-mark", state="attached")
        assert page.evaluate("getComputedStyle(document.querySelector('#easel-test-ext-mark')).color") == "rgb(1, 2, 3)"
        assert page.evaluate("window.easelOtherExtension") is None  # disabled: its script is not in the page
        page.wait_for_function("window.easelUiLoaded === true")

        page.get_by_role("tab", name="Extensions").click()
        row = page.locator('#extensions_table tr[data-extension="easel-test-ext"]')
        row.wait_for()
        assert str(ext_server.origin) in row.inner_text() and "main" in row.inner_text()
        assert "disabled" in page.locator('#extensions_table tr[data-extension="other-ext"]').inner_text()
        group = page.locator("#extensions_enabled")
        assert group.get_by_label("easel-test-ext").is_checked()
        assert not group.get_by_label("other-ext").is_checked()

        group.get_by_label("easel-test-ext").uncheck()
        group.get_by_label("other-ext").check()
        # the server restarts and the page reloads by itself when it is back, with the other extension's script
        with page.expect_navigation(timeout=300_000):
            page.click("#extensions_apply")
            page.wait_for_function("document.querySelector('#extensions_message').innerText.includes('Restarting')")
        page.wait_for_function("window.easelOtherExtension === 1")
        assert page.evaluate("window.easelTestExtension") is None
    ext_server.wait()
    assert json.loads((ext_server.data_dir / "config.json").read_text())["disabled_extensions"] == ["easel-test-ext"]
    enabled = {e["name"]: e["enabled"] for e in httpx.get(ext_server.url + "/sdapi/v1/extensions", timeout=30).json()}
    assert enabled == {"easel-test-ext": False, "other-ext": True}
    assert httpx.get(ext_server.url + "/extension-assets/easel-test-ext/javascript/mark.js", timeout=30).status_code == 404


def test_front_end_files_need_the_web_ui_login(tmp_path):
    data = tmp_path / "data"
    js = data / "extensions" / "private-ext" / "javascript"
    js.mkdir(parents=True)
    (js / "p.js").write_text("window.easelPrivate = 1;\n")
    with Server(data, ["--gradio-auth", "a:pw"]) as srv, httpx.Client(timeout=30) as client:
        url = srv.url + "/extension-assets/private-ext/javascript/p.js"
        assert client.get(url).status_code == 401
        assert client.post(srv.url + "/login", data={"username": "a", "password": "pw"}).json() == {"success": True}
        answer = client.get(url)
        assert answer.status_code == 200 and "easelPrivate" in answer.text


def test_tab_installs_from_a_git_url_and_says_when_the_index_is_offline(ext_server, tmp_path):
    origin = tmp_path / "sd-webui-from-url"
    (origin / "scripts").mkdir(parents=True)
    (origin / "scripts" / "s.py").write_text("")
    _git("init", "-q", "-b", "main", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "first", cwd=origin)
    with browser_page(ext_server.url) as page:
        page.get_by_role("tab", name="Extensions").click()
        page.get_by_role("tab", name="Available").click()
        page.locator("#extensions_index_url textarea, #extensions_index_url input").first.fill("http://127.0.0.1:9/index.json")
        page.click("#extensions_load_available")
        page.wait_for_function("document.querySelector('#extensions_available_list').innerText.includes('offline')")

        page.get_by_role("tab", name="Install from URL").click()
        page.locator("#extensions_install_url textarea, #extensions_install_url input").first.fill(origin.as_uri())
        page.click("#extensions_install_button")
        page.wait_for_function("document.querySelector('#extensions_install_result').innerText.includes('Installed into')")
        assert (ext_server.data_dir / "extensions" / "sd-webui-from-url" / "scripts" / "s.py").is_file()
        page.click("#extensions_install_button")  # again: the folder exists
        page.wait_for_function("document.querySelector('#extensions_install_result').innerText.includes('already exists')")
        page.get_by_role("tab", name="Installed").click()
        page.locator('#extensions_table tr[data-extension="sd-webui-from-url"]').wait_for()
    listed = {e["name"]: e for e in httpx.get(ext_server.url + "/sdapi/v1/extensions", timeout=30).json()}
    assert listed["sd-webui-from-url"]["remote"] == origin.as_uri() and listed["sd-webui-from-url"]["enabled"] is True


def test_tab_updates_an_extension_and_disables_the_extra_ones(ext_server):
    """After "Check for updates" the extension whose git remote has a new commit is ticked for update; "Apply and
    restart UI" with "Disable all extensions": extra updates it from the remote and, once restarted, runs no extra
    extension (the list of enabled ones is kept)."""
    origin, clone = ext_server.origin, ext_server.data_dir / "extensions" / "easel-test-ext"
    (origin / "javascript" / "mark.js").write_text(MARK_JS + "window.easelTestExtensionVersion = 2;\n")
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "second", cwd=origin)
    head = lambda path: subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    new, old = head(origin), head(clone)
    assert new != old
    with browser_page(ext_server.url) as page:
        page.get_by_role("tab", name="Extensions").click()
        assert page.locator("#extensions_disable_all").get_by_label("none").is_checked()
        page.click("#extensions_check_updates")
        page.wait_for_function("document.querySelector('#extensions_table').innerText.includes('behind (1 new commits)')")
        ticked = page.locator("#extensions_update").get_by_label("easel-test-ext")
        ticked.wait_for()
        assert ticked.is_checked()
        assert head(clone) == old  # checking changes nothing
        group = page.locator("#extensions_enabled")
        group.get_by_label("easel-test-ext").check()
        group.get_by_label("other-ext").check()
        page.locator("#extensions_disable_all").get_by_label("extra").check()
        with page.expect_navigation(timeout=300_000):
            page.click("#extensions_apply")
            page.wait_for_function("document.querySelector('#extensions_message').innerText.includes('Restarting')")
        page.get_by_role("tab", name="Extensions").click()
        page.locator("#extensions_disable_all").get_by_label("extra").wait_for()
        page.wait_for_function("document.querySelector('#extensions_disable_all input[value=\"extra\"]').checked")
        assert "only built-in extensions run" in page.locator("#extensions_tabs").inner_text()
        assert page.evaluate("window.easelTestExtension") is None and page.evaluate("window.easelOtherExtension") is None
    ext_server.wait()
    assert head(clone) == new and "easelTestExtensionVersion" in (clone / "javascript" / "mark.js").read_text()
    stored = json.loads((ext_server.data_dir / "config.json").read_text())
    assert stored["disable_all_extensions"] == "extra" and "easel-test-ext" not in stored["disabled_extensions"]
    listed = {e["name"]: e for e in httpx.get(ext_server.url + "/sdapi/v1/extensions", timeout=30).json()}
    assert listed["easel-test-ext"]["enabled"] is True and listed["easel-test-ext"]["commit_hash"] == new
    for path in ("easel-test-ext/javascript/mark.js", "other-ext/javascript/o.js"):  # not running: not served
        assert httpx.get(ext_server.url + "/extension-assets/" + path, timeout=30).status_code == 404
