"""LAN safety: warning and banner without logins, Host-header check (DNS rebinding), docs behind --api-auth,
failed logins slowed down, request body and upload size limits."""
from __future__ import annotations

import socket
import time
from unittest.mock import MagicMock

import httpx
import pytest

from api.http_guard import AllowedHosts, LoginThrottle, host_name
from backend.core.cmd_args import parse_args
from backend.exposure import exposure_warnings
from conftest import Server

ERROR_KEYS = {"error", "detail", "body", "errors"}


# -- units --------------------------------------------------------------------------------------------

def test_exposure_warnings_name_the_unprotected_parts():
    both = exposure_warnings(parse_args(["--listen", "--api"]))
    assert len(both) == 2 and "--gradio-auth" in both[0] and "--api-auth" in both[1]
    assert exposure_warnings(parse_args(["--api"])) == []  # 127.0.0.1 only
    assert exposure_warnings(parse_args(["--server-name", "localhost", "--api"])) == []
    assert exposure_warnings(parse_args(["--server-name", "::1"])) == []
    assert len(exposure_warnings(parse_args(["--server-name", "192.168.1.5"]))) == 1
    assert exposure_warnings(parse_args(["--share", "--gradio-auth", "a:b"])) == []
    only_api = exposure_warnings(parse_args(["--listen", "--api", "--gradio-auth", "a:b"]))
    assert len(only_api) == 1 and "/sdapi/v1" in only_api[0]
    assert exposure_warnings(parse_args(["--listen", "--nowebui", "--api-auth", "u:p"])) == []


def test_allowed_hosts():
    allowed = AllowedHosts(["easel.lan", ".lab.example"])
    assert host_name("[::1]:7860") == "::1" and host_name("LocalHost.:80") == "localhost"
    for ok in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "10.1.2.3", "app.localhost", "easel.lan:7860",
               "lab.example", "a.b.lab.example", None):
        assert allowed.allows(ok), ok
    for bad in ("evil.example", "easel.lan.evil.example", "evillab.example", "localhost.evil.example", ""):
        assert not allowed.allows(bad), bad
    allowed.add("abc123.gradio.live")
    assert allowed.allows("abc123.gradio.live")
    assert AllowedHosts(["*"]).allows("anything.example")


def test_login_throttle_grows_per_client_and_forgets():
    now = [1000.0]
    throttle = LoginThrottle(free_failures=3, window_s=600, first_block_s=2, max_block_s=16, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("a")
    assert throttle.retry_after("a") == 0
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(2)
    assert throttle.retry_after("b") == 0  # other clients are not affected
    now[0] += 2
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(4)  # each further failure doubles the wait
    for _ in range(5):
        now[0] += 100
        throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(16)  # capped
    throttle.succeeded("a")
    assert throttle.retry_after("a") == 0
    for _ in range(3):
        throttle.failed("c")
    now[0] += 601
    assert throttle.retry_after("c") == 0  # failures older than the window are forgotten


def test_api_only_app_has_the_same_guards():
    """--nowebui: the FastAPI app of app.py, in process (its routes are not called, only the guards)."""
    from fastapi.testclient import TestClient

    import app as easel_app
    from api.http_guard import allowed_hosts_for
    args = parse_args(["--nowebui", "--api-auth", "u:p"])
    service = MagicMock()  # the routes hold it; none of them runs here
    service.options = {"api_max_request_body_mb": 1}
    throttle = LoginThrottle()
    guards = easel_app.guard_middleware(service, args, allowed_hosts_for(args), throttle)
    with TestClient(easel_app.create_api_app(service, args, guards, throttle), base_url="http://127.0.0.1") as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, auth=("u", "p")).status_code == 200, path
        assert client.get("/docs", headers={"Host": "evil.example"}, auth=("u", "p")).status_code == 400
        big = client.post("/sdapi/v1/options", content=b"{}" + b" " * 2**21, auth=("u", "p"),
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and set(big.json()) == ERROR_KEYS


# -- a server on the LAN without logins ---------------------------------------------------------------

@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("lan-open"), ["--listen", "--allowed-hosts", "easel.lan,.lab.example"]) as srv:
        yield srv


def test_warning_in_log_and_banner_in_page(open_server):
    log = open_server.log_path.read_text(errors="replace")
    assert "SECURITY WARNING" in log and "--gradio-auth" in log and "--api-auth" in log
    page = httpx.get(open_server.url + "/", timeout=30).text
    assert "easel_lan_warning" in page and "without a login" in page


def test_host_header_check(open_server):
    url, port = open_server.url, open_server.port
    for path in ("/", "/sdapi/v1/samplers", "/gradio_api/info"):
        r = httpx.get(url + path, headers={"Host": f"evil.example:{port}"}, timeout=30)
        assert r.status_code == 400, path
        assert set(r.json()) == ERROR_KEYS and "--allowed-hosts" in r.json()["detail"]
    assert httpx.post(url + "/sdapi/v1/options", json={}, headers={"Host": "evil.example"}).status_code == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"easel.lan:{port}", "pc.lab.example",
                 socket.gethostname()):
        assert httpx.get(url + "/sdapi/v1/samplers", headers={"Host": host}, timeout=30).status_code == 200, host
    assert httpx.get(url + "/sdapi/v1/samplers", headers={"Host": "easel.lan.evil.example"}).status_code == 400


def test_request_body_limit(open_server):
    api = open_server.url + "/sdapi/v1"
    assert httpx.post(api + "/options", json={"api_max_request_body_mb": 1}).status_code == 200
    try:
        too_big = b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}'
        r = httpx.post(api + "/txt2img", content=too_big, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and set(r.json()) == ERROR_KEYS and "api_max_request_body_mb" in r.json()["detail"]

        def chunks():  # no Content-Length: cut off while streaming
            for _ in range(40):
                yield b" " * 65536

        r = httpx.post(api + "/txt2img", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and set(r.json()) == ERROR_KEYS
        assert httpx.get(api + "/samplers").status_code == 200  # the server goes on
    finally:
        assert httpx.post(api + "/options", json={"api_max_request_body_mb": 256}).status_code == 200
    r = httpx.post(api + "/txt2img", content=too_big, headers={"content-type": "application/json"}, timeout=60)
    # the body is read now: what answers is the prompt-length limit (prompt_max_chunks), not the body limit
    assert r.status_code == 413 and "prompt_max_chunks" in r.json()["detail"]
    assert "api_max_request_body_mb" not in r.json()["detail"]


def test_upload_limit_follows_the_setting(open_server):
    api = open_server.url + "/sdapi/v1"
    assert httpx.post(api + "/options", json={"upload_max_file_size_mb": 1}).status_code == 200
    try:
        r = httpx.post(open_server.url + "/gradio_api/upload",
                       files={"files": ("big.png", b"x" * (2 * 2**20), "image/png")}, timeout=60)
        assert r.status_code == 413
        r = httpx.post(open_server.url + "/gradio_api/upload",
                       files={"files": ("small.png", b"x" * 2**19, "image/png")}, timeout=60)
        assert r.status_code == 200
    finally:
        assert httpx.post(api + "/options", json={"upload_max_file_size_mb": 256}).status_code == 200


# -- a server with logins -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("lan-auth"), ["--listen", "--api-auth", "u:secret", "--gradio-auth", "a:pw"])
    try:
        srv.wait(auth=("u", "secret"))
        yield srv
    finally:
        srv.stop()


def _client_from(address: str) -> httpx.Client:
    """A client connecting from another loopback address (the server listens on 0.0.0.0): another 'machine'."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_no_warning_with_logins(auth_server):
    assert "SECURITY WARNING" not in auth_server.log_path.read_text(errors="replace")


def test_docs_need_the_api_login(auth_server):
    with _client_from("127.0.0.6") as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = client.get(auth_server.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", path
            assert client.get(auth_server.url + path, auth=("u", "secret")).status_code == 200, path
        assert "/sdapi/v1/txt2img" in client.get(auth_server.url + "/openapi.json", auth=("u", "secret")).text


def test_failed_api_logins_are_throttled_per_client(auth_server):
    url = auth_server.url + "/sdapi/v1/samplers"
    with _client_from("127.0.0.4") as guesser, _client_from("127.0.0.5") as other:
        codes = [guesser.get(url, auth=("u", f"guess{i}")).status_code for i in range(5)]
        assert codes == [401] * 5
        r = guesser.get(url, auth=("u", "guess5"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and set(r.json()) == ERROR_KEYS
        assert guesser.get(url, auth=("u", "secret")).status_code == 429  # even the right password waits
        assert other.get(url, auth=("u", "secret")).status_code == 200  # others log in as usual
        wait = int(r.headers["retry-after"])
        time.sleep(wait + 0.5)  # the wait it was told (2 s): then it is heard again
        assert guesser.get(url, auth=("u", "secret")).status_code == 200


def test_failed_ui_logins_are_throttled_per_client(auth_server):
    url = auth_server.url + "/login"
    with _client_from("127.0.0.2") as guesser, _client_from("127.0.0.3") as other:
        codes = [guesser.post(url, data={"username": "a", "password": f"guess{i}"}).status_code for i in range(5)]
        assert codes == [400] * 5
        r = guesser.post(url, data={"username": "a", "password": "guess5"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        r = other.post(url, data={"username": "a", "password": "pw"})
        assert r.status_code == 200 and r.json() == {"success": True}
