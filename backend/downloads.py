"""Downloads on explicit need only (a default checkpoint), with a progress bar, into models/.

Offline, `network_available` answers quickly and callers say so clearly.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from backend.core.errors import UserError

log = logging.getLogger(__name__)


def network_available(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def download_file(url: str, dest: Path, progress: Callable[[int, int], None] | None = None, chunk: int = 1 << 20) -> Path:
    """Download `url` to `dest` through a `.part` file; a tqdm bar in the console, `progress(done, total)` for the UI."""
    import requests
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0))
            done = 0
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for block in r.iter_content(chunk):
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
                    if progress:
                        progress(done, total)
        part.replace(dest)
    except requests.RequestException as exc:
        part.unlink(missing_ok=True)
        raise UserError(f"Download of {url} failed: {exc}. Check your internet connection, or put the file in {dest.parent} by hand.") from exc
    log.info("downloaded %s", dest)
    return dest
