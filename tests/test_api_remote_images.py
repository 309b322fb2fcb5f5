"""Issue 14: img2img's `init_images` and `mask` as http(s) URLs, as AUTOMATIC1111's `api_enable_requests` and
`api_forbid_local_requests` (both on by default): local addresses refused, redirects checked, failures a clear 4xx
naming the URL. A local HTTP server in the test serves the pictures."""
from __future__ import annotations

import base64
import http.server
import io
import socket
import threading

import pytest
from PIL import Image

from backend.core import remote_images
from backend.core.errors import UserError
from backend.core.remote_images import RemoteImagePolicy, is_local_address

SD1 = "tiny-sd1.safetensors"


def png_bytes(size=(64, 64), colour=(20, 160, 220), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


PICTURE = png_bytes((80, 64))
MASK = png_bytes((80, 64), 255, mode="L")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        port = self.server.server_address[1]
        routes = {"/pic.png": (200, PICTURE, "image/png"), "/mask.png": (200, MASK, "image/png"),
                  "/text.txt": (200, b"not a picture", "text/plain")}
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/pic.png")
            self.end_headers()
            return
        if self.path == "/redirect-elsewhere":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/pic.png")
            self.end_headers()
            return
        status, body, kind = routes.get(self.path, (404, b"nothing here", "text/plain"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pictures():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(url: str, **kw) -> dict:
    b = {"init_images": [url], "prompt": "a boat", "steps": 2, "width": 64, "height": 64, "denoising_strength": 0.5,
         "seed": 3, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": SD1}}
    b.update(kw)
    return b


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.20", True), ("169.254.169.254", True),
    ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True), ("240.0.0.1", True), ("::1", True),
    ("fe80::1", True), ("fc00::1", True), ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True),
    ("8.8.8.8", False), ("93.184.216.34", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
])
def test_local_addresses(address, local):
    assert is_local_address(address) is local


def test_policy_fetches_follows_redirects_and_refuses(pictures, monkeypatch):
    open_policy = RemoteImagePolicy(forbid_local=False)
    assert open_policy.fetch(pictures + "/pic.png", "init_images[0]") == PICTURE
    assert open_policy.fetch(pictures + "/redirect", "init_images[0]") == PICTURE
    with pytest.raises(UserError) as err:  # local addresses forbidden (the default)
        RemoteImagePolicy().fetch(pictures + "/pic.png", "mask")
    assert err.value.status == 403 and "api_forbid_local_requests" in err.value.message and "/pic.png" in err.value.message
    with pytest.raises(UserError) as err:
        RemoteImagePolicy(enabled=False).fetch(pictures + "/pic.png", "mask")
    assert err.value.status == 403 and "api_enable_requests" in err.value.message
    with pytest.raises(UserError) as err:  # the download stops at the size limit
        RemoteImagePolicy(forbid_local=False, max_bytes=100).fetch(pictures + "/pic.png", "mask")
    assert err.value.status == 413
    # every redirect is checked: 127.0.0.1 counted as public here, 127.0.0.2 (where it redirects) as local
    monkeypatch.setattr(remote_images, "is_local_address", lambda a: a != "127.0.0.1")
    assert RemoteImagePolicy().fetch(pictures + "/pic.png", "mask") == PICTURE
    with pytest.raises(UserError) as err:
        RemoteImagePolicy().fetch(pictures + "/redirect-elsewhere", "mask")
    assert err.value.status == 403 and "127.0.0.2" in err.value.message


def test_urls_through_the_api(api, pictures):
    url = pictures + "/pic.png"
    r = api.post("/img2img", json=body(url))  # default: local addresses are forbidden
    assert r.status_code == 403 and url in r.json()["detail"] and "api_forbid_local_requests" in r.json()["detail"]
    assert api.post("/options", json={"api_forbid_local_requests": False}).status_code == 200
    try:
        r = api.post("/img2img", json=body(url, mask=pictures + "/mask.png", inpaint_full_res=False, width=80))
        assert r.status_code == 200, r.text
        out = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert out.size == (80, 64)
        r = api.post("/img2img", json=body(pictures + "/redirect"))
        assert r.status_code == 200, r.text
        # failures: a 4xx naming the URL
        for bad, words in ((pictures + "/missing.png", "HTTP 404"), (pictures + "/text.txt", "not an image"),
                           (f"http://127.0.0.1:{closed_port()}/pic.png", "could not fetch")):
            r = api.post("/img2img", json=body(bad))
            assert 400 <= r.status_code < 500 and bad in r.json()["detail"] and words in r.json()["detail"], r.text
        r = api.post("/img2img", json=body(pictures + "/pic.png", mask=pictures + "/missing.png"))
        assert r.status_code == 400 and r.json()["detail"].startswith("mask:")
        # requests off: refused
        assert api.post("/options", json={"api_enable_requests": False}).status_code == 200
        r = api.post("/img2img", json=body(url))
        assert r.status_code == 403 and "api_enable_requests" in r.json()["detail"]
    finally:
        api.post("/options", json={"api_forbid_local_requests": True, "api_enable_requests": True})
    assert api.get("/options").json()["api_forbid_local_requests"] is True
