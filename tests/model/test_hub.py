from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from model import hub

PAYLOAD = b"weights" * 1000
PAYLOAD_HASH = hashlib.sha256(PAYLOAD).hexdigest()[:8]


@pytest.fixture
def http_server() -> Iterator[str]:
    """A local server answering every GET with PAYLOAD; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_cached_file_is_returned_without_network(hub_dir, monkeypatch):
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / "net-0123abcd.pth").write_bytes(b"x")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
    assert (
        hub.fetch_checkpoint("https://example.org/m/net-0123abcd.pth")
        == hub_dir / "checkpoints" / "net-0123abcd.pth"
    )


def test_download_checks_the_hash_in_the_name(hub_dir, http_server, no_proxy):
    good = hub.fetch_checkpoint(f"{http_server}/net-{PAYLOAD_HASH}.pth", timeout_s=5)
    assert good.read_bytes() == PAYLOAD
    with pytest.raises(hub.DownloadError, match="hash"):
        hub.fetch_checkpoint(f"{http_server}/net-deadbeef.pth", timeout_s=5)
    assert sorted(p.name for p in (hub_dir / "checkpoints").iterdir()) == [good.name]  # no partial file


def test_an_unresolvable_host_fails_before_any_download(hub_dir, monkeypatch, no_proxy):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    monkeypatch.setattr(hub, "_socket_timeout", lambda s: pytest.fail("download attempted"))
    with pytest.raises(hub.DownloadError, match="Name or service not known"):
        hub.fetch_checkpoint("https://download.example/m/net-0123abcd.pth", timeout_s=1.0)


def test_a_stuck_name_lookup_is_abandoned_after_the_timeout(hub_dir, monkeypatch, no_proxy):
    def stuck_lookup(*args, **kwargs):  # getaddrinfo hanging, then failing (in the abandoned thread)
        time.sleep(5)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", stuck_lookup)
    start = time.monotonic()
    with pytest.raises(hub.DownloadError, match="no answer"):
        hub.fetch_checkpoint("https://download.example/m/net-0123abcd.pth", timeout_s=0.3)
    assert time.monotonic() - start < 1.5


def test_a_silent_server_times_out_instead_of_hanging(hub_dir, no_proxy):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # the kernel accepts the TCP connection, nobody ever answers the request
    previous = socket.getdefaulttimeout()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/net-0123abcd.pth"
        start = time.monotonic()
        with pytest.raises(hub.DownloadError, match=r"net-0123abcd\.pth"):
            hub.fetch_checkpoint(url, timeout_s=0.5)
        assert time.monotonic() - start < 3.0
    finally:
        server.close()
    assert not (hub_dir / "checkpoints" / "net-0123abcd.pth").exists()
    assert socket.getdefaulttimeout() == previous
