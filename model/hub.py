"""Downloads into the torch hub cache that cannot hang: the cache first, then a bounded wait.

``torch.hub`` opens URLs with no timeout, and a name lookup or a silently dropped connection can
block for minutes. ``fetch_checkpoint`` returns a cached file without touching the network; otherwise
it probes the host (or the proxy) in a thread joined with a timeout, so even a stuck DNS lookup
cannot hold it, and downloads with a socket timeout on every read. Standard library at import time.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse


class DownloadError(ConnectionError):
    """The file is not cached and could not be downloaded; the message names the cache path."""


def cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url`` (``<hub dir>/checkpoints/<name>``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def fetch_checkpoint(url: str, *, timeout_s: float = 10.0) -> Path:
    """The cached file for ``url``, downloaded first if absent (checked against the hash prefix in its
    name, as torch.hub does). The network gets ``timeout_s`` to answer each step; any failure raises
    ``DownloadError`` and leaves no partial file."""
    import torch

    cached = cache_path(url)
    if cached.is_file():
        return cached
    try:
        _probe(url, timeout_s)
        cached.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]*)\.", cached.name)
        with _socket_timeout(timeout_s):
            torch.hub.download_url_to_file(
                url, str(cached), hash_prefix.group(1) if hash_prefix else None, progress=False
            )
    except (OSError, http.client.HTTPException, RuntimeError) as e:  # RuntimeError: hash mismatch
        raise DownloadError(
            f"cannot download {url} ({type(e).__name__}: {e}). Offline? Copy {cached.name} into {cached.parent}"
        ) from None
    return cached


def _probe(url: str, timeout_s: float) -> None:
    """Raise ``TimeoutError``/``OSError`` unless the host (or the proxy for its scheme) accepts a TCP
    connection within ``timeout_s``. Runs in a daemon thread: ``getaddrinfo`` ignores socket timeouts."""
    parts = urlparse(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, name="refinedet-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"no answer from {address[0]} within {timeout_s:g} s")
    if outcome[0] is not None:
        raise outcome[0]


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound each blocking socket operation of urllib, which torch.hub calls without a timeout.
    Process-wide while it lasts; the previous default is restored afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
