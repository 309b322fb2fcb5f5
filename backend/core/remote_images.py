"""Input images given as http(s) URLs (AUTOMATIC1111's `api_enable_requests` / `api_forbid_local_requests`).

A1111's API accepts a URL wherever it takes a base64 image and fetches it. Easel does the same for img2img's
`init_images` and `mask`, in the app process, with the two settings (both on by default):

- `api_enable_requests` off: a URL is refused (403).
- `api_forbid_local_requests` on: the host is resolved and every address it resolves to must be a public one
  (not loopback, private, link-local, reserved, multicast or unspecified, IPv4-mapped IPv6 included); the
  connection goes to the address that was checked (no second lookup a DNS answer could change in between), and
  each redirect is checked the same way.

The download is limited to the request body limit (`api_max_request_body_mb`: a URL brings no more than a base64
image could) and to `TIMEOUT` seconds per read. Every failure is a 4xx UserError naming the field and the URL.
Standard library only.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from backend.core.errors import UserError

TIMEOUT = 30.0
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def is_url(data: object) -> bool:
    return isinstance(data, str) and data.lstrip()[:8].lower().startswith(("http://", "https://"))


def is_local_address(address: str) -> bool:
    """Whether an IP address is one a server must not be made to reach for a client (A1111's check, and more)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast
            or ip.is_unspecified or not ip.is_global)


@dataclass(frozen=True)
class RemoteImagePolicy:
    """The settings that govern URL inputs, read from the server's options for one request."""
    enabled: bool = True
    forbid_local: bool = True
    max_bytes: int = 256 * 2**20
    timeout: float = TIMEOUT

    @classmethod
    def from_options(cls, options) -> "RemoteImagePolicy":
        return cls(enabled=bool(options["api_enable_requests"]), forbid_local=bool(options["api_forbid_local_requests"]),
                   max_bytes=int(options["api_max_request_body_mb"]) * 2**20)

    def fetch(self, url: str, field: str) -> bytes:
        """The body of `url` (following redirects), or a UserError naming `field` and the URL."""
        url = url.strip()
        if not self.enabled:
            raise UserError(f"{field}: URLs are not allowed as input images ({_shown(url)}); the setting "
                            "api_enable_requests is off. Send the image as base64.", status=403)
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self._get(url, field)
            if status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                raise UserError(f"{field}: fetching {_shown(url)} answered HTTP {status}.", status=400)
            return body
        raise UserError(f"{field}: {_shown(url)} redirects more than {MAX_REDIRECTS} times.", status=400)

    def _get(self, url: str, field: str) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UserError(f"{field}: only http:// and https:// URLs are fetched, got {_shown(url)}.", status=400)
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError as exc:
            raise UserError(f"{field}: {_shown(url)} is not a valid URL ({exc}).", status=400) from None
        address = self._address(parts.hostname, port, url, field)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = (_PinnedHTTPS if https else _PinnedHTTP)(parts.hostname, port, address, self.timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": "Easel", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if resp.status != 200:
                return resp.status, None, b""
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise self._too_large(url, field)
            body = resp.read(self.max_bytes + 1)
            if len(body) > self.max_bytes:
                raise self._too_large(url, field)
            return 200, None, body
        except UserError:
            raise
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            raise UserError(f"{field}: could not fetch {_shown(url)} ({type(exc).__name__}: {exc}).",
                            status=400) from None
        finally:
            conn.close()

    def _address(self, host: str, port: int, url: str, field: str) -> str:
        """The address to connect to: the first one `host` resolves to, each checked when local ones are forbidden."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise UserError(f"{field}: could not resolve the host of {_shown(url)} ({exc}).", status=400) from None
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise UserError(f"{field}: the host of {_shown(url)} has no address.", status=400)
        if self.forbid_local and any(is_local_address(a) for a in addresses):
            raise UserError(f"{field}: {_shown(url)} points to a local address ({host}); requests to local resources "
                            "are forbidden (the setting api_forbid_local_requests).", status=403)
        return addresses[0]

    def _too_large(self, url: str, field: str) -> UserError:
        return UserError(f"{field}: {_shown(url)} is larger than {self.max_bytes / 2**20:g} MB, the limit set by the "
                         "setting api_max_request_body_mb.", status=413)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an address resolved (and checked) beforehand; the Host header keeps the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _shown(url: str, limit: int = 200) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")
