"""The HTTP protocol's limits (service/protocol.py) and the body timeout, under a real uvicorn server with
the options ``refinedet serve`` uses: oversized headers get 431, idle and slow connections are closed
(408 when part of a request came), connections beyond the cap get 503, malformed requests get JSON 400;
every answer is the service's JSON error format. Admission's refusals are answered by the protocol from
the request's headers (before its body), and the connection stays usable: keep-alive, chunked bodies,
pipelining, ``Expect: 100-continue``."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
from service_testing import (
    connect,
    encode,
    gated_loader,
    noise_image,
    poll,
    read_response,
    serving,
    settings,
    standin_loader,
)
from test_server import metric_samples

from service.app import create_app

LIMITS = {"max_header_bytes": 4096, "header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_connections": 8}


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_oversized_headers_get_431_before_the_app():
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        whole = connect(url)
        whole.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        status, headers, body = read_response(whole)
        assert (status, body["error"]["code"]) == (431, "headers_too_large")
        assert headers["connection"] == "close"
        # Headers that never end: refused as soon as they pass the limit, not buffered.
        endless = connect(url)
        endless.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(16):
            try:
                endless.sendall(b"b" * 1024)
            except OSError:
                break
        status, _, body = read_response(endless)
        assert (status, body["error"]["code"]) == (431, "headers_too_large")
        small = connect(url)
        small.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(small)[0] == 200


def test_idle_and_slow_connections_are_closed():
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        idle = [connect(url) for _ in range(5)]
        slow = connect(url)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        status, _, body = read_response(slow)
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        poll(lambda: all(closed_by_server(s) for s in idle), 10, "idle connections to be closed")


def test_a_connection_accepted_as_the_server_stops_gets_its_first_request_answered():
    """A connection whose first request had not come when the server began to stop (accepted just before
    the signal: its request is on its way) is answered, with ``Connection: close``; before, uvicorn closed it
    unanswered. One that sends nothing is closed soon after."""
    app = create_app(settings(), loader=standin_loader())
    with serving(app) as (url, server):
        fresh, idle = connect(url), connect(url)
        poll(lambda: len(server.server_state.connections) == 2, 10, "both connections accepted")
        server.should_exit = True  # what SIGTERM does
        poll(lambda: not app.state.service.ready, 10, "the drain to begin")
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(fresh)
        assert (status, headers["connection"]) == (200, "close")
        poll(lambda: closed_by_server(idle), 10, "the idle connection to be closed")


def test_a_stalled_body_gets_408():
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        stalled = connect(url)
        stalled.sendall(
            b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
            + b"\xff\xd8" * 8
        )
        status, headers, body = read_response(stalled)
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert headers["connection"] == "close"


def test_connections_beyond_the_cap_get_503_and_malformed_requests_json_400():
    app = create_app(settings(**{**LIMITS, "header_timeout_s": 30}), loader=standin_loader())
    with serving(app) as (url, server):
        held = [connect(url) for _ in range(LIMITS["max_connections"])]
        poll(lambda: len(server.server_state.connections) >= len(held), 10, "connections to be accepted")
        extra = connect(url)
        status, headers, body = read_response(extra)
        assert (status, body["error"]["code"]) == (503, "overloaded") and headers["retry-after"] == "1"
        for sock in held:
            sock.close()
        poll(lambda: len(server.server_state.connections) <= 1, 10, "connections to close")
        bad = connect(url)
        bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = read_response(bad)
        assert (status, body["error"]["code"]) == (400, "bad_request")


def test_keep_alive_connections_still_serve_several_requests():
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        sock = connect(url)
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200


IMAGE = encode(noise_image(64, 48, seed=5))
DETECT_HEAD = "POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def statuses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of the next ``count`` responses on ``sock`` (each with a Content-Length), in order."""
    stream = sock.makefile("rb")
    found = []
    for _ in range(count):
        found.append(int(stream.readline().split()[1]))
        length = 0
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            length = int(value) if name.strip().lower() == b"content-length" else length
        stream.read(length)
    return found


@contextlib.contextmanager
def refusing(**changes) -> Iterator[tuple[str, object]]:
    """A server whose one queue place is taken by a request the engine holds, so every other inference
    request is refused; yields (URL, app). The held request is let through (and answered 200) at the end."""
    loader = gated_loader(max_batch=1)
    app = create_app(settings(max_batch_size=1, max_delay_ms=0, max_queue_size=1, **changes), loader=loader)
    engine = loader.backend
    with serving(app) as (url, _):
        held = ThreadPoolExecutor(1).submit(
            httpx.post, f"{url}/detect", content=IMAGE, headers={"content-type": "image/jpeg"}, timeout=60
        )
        poll(engine.running.is_set, what="a request to hold the only queue place")
        try:
            yield url, app
        finally:
            engine.release()
            assert held.result().status_code == 200
    assert app.state.service.admission.admitted == 0  # every admission was given back


def test_a_refusal_is_answered_from_the_headers_and_the_connection_kept():
    """The 503 comes before the body is sent (the server does not wait for it); the body, sent after, is
    dropped and the same connection serves the next request."""
    with refusing(body_timeout_s=30) as (url, _):
        sock = connect(url)
        sock.sendall(f"{DETECT_HEAD}Content-Length: 2000\r\n\r\n".encode() + b"\xff" * 1000)
        status, headers, body = read_response(sock)  # only half the body has been sent
        assert (status, body["error"]["code"]) == (503, "overloaded")
        assert int(headers["retry-after"]) >= 1 and headers["x-request-id"] and "connection" not in headers
        sock.sendall(b"\xff" * 1000 + HEALTHZ)
        assert read_response(sock)[0] == 200


def test_refused_chunked_and_pipelined_requests_are_answered_in_order():
    with refusing(body_timeout_s=30) as (url, _):
        sock = connect(url)
        sock.sendall(
            f"{DETECT_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + b"400\r\n" + b"\xff" * 1024
        )
        assert read_response(sock)[0] == 503  # after the first chunk
        sock.sendall(b"\r\n10\r\n" + b"\xff" * 16 + b"\r\n0\r\n\r\n" + HEALTHZ)
        assert read_response(sock)[0] == 200
        # Pipelined: a refusal is written only once the answers before it on the connection are.
        post = f"{DETECT_HEAD}Content-Length: {len(IMAGE)}\r\n\r\n".encode() + IMAGE
        sock.sendall(HEALTHZ + post + post + HEALTHZ)
        assert statuses(sock, 4) == [200, 503, 503, 200]


def test_a_refusal_closes_when_no_body_will_come_or_it_is_too_large():
    with refusing(max_upload_bytes=4096) as (url, _):
        waiting = connect(url)  # waits for "100 Continue" before sending its body: it will not send it
        waiting.sendall(f"{DETECT_HEAD}Content-Length: 3000\r\nExpect: 100-continue\r\n\r\n".encode())
        too_large = connect(url)
        too_large.sendall(f"{DETECT_HEAD}Content-Length: 999999\r\n\r\n".encode() + b"\xff" * 8192)
        asked = connect(url)
        asked.sendall(f"{DETECT_HEAD}Connection: close\r\nContent-Length: 10\r\n\r\n0123456789".encode())
        for sock in (waiting, too_large, asked):
            status, headers, _ = read_response(sock)
            assert (status, headers["connection"]) == (503, "close")
            assert sock.recv(1) == b""  # and the server closed (its side)
        # A chunked body is dropped only up to the limit: past it, the connection is closed.
        endless = connect(url)
        endless.sendall(f"{DETECT_HEAD}Transfer-Encoding: chunked\r\n\r\n".encode())
        assert read_response(endless)[0] == 503
        endless.sendall(b"2000\r\n" + b"\xff" * 8192 + b"\r\n")
        assert endless.recv(1) == b""


def test_a_refusal_is_counted_and_logged_like_any_answer(caplog):
    with caplog.at_level(logging.INFO, logger="refinedet.access"), refusing(access_log=True) as (url, _):
        refused = httpx.post(
            f"{url}/detect", content=IMAGE, headers={"content-type": "image/jpeg", "x-request-id": "abc-1"}
        )
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    assert refused.status_code == 503 and refused.headers["x-request-id"] == "abc-1"
    labels = (("method", "POST"), ("route", "/detect"), ("status", "503"))
    assert metrics[("refinedet_http_requests_total", labels)] == 1
    assert metrics[("refinedet_dropped_requests_total", (("reason", "admission"),))] == 1
    [line] = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "abc-1"]
    assert (line["event"], line["path"], line["status"]) == ("access", "/detect", 503)
    assert line["response_bytes"] == len(refused.content)


WEBSOCKET = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def test_an_upgrade_is_answered_as_plain_http_in_the_json_format():
    """The service has no WebSocket routes (issue #25, finding 6: an upgrade got uvicorn's 403 with an empty
    text/plain body): the Upgrade header is ignored, as RFC 9110 (7.8) lets a server, and the request gets
    the answer it would get without it, on a connection that stays open, with no warning logged for each.
    An upgrade with a body is refused 400 (httptools takes what follows the headers for the new protocol)."""
    warnings: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = warnings.append  # type: ignore[method-assign]
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        logging.getLogger("uvicorn.error").addHandler(catcher)
        try:
            sock = connect(url)
            sock.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\n{WEBSOCKET}\r\n".encode())
            status, headers, body = read_response(sock)
            assert (status, body["error"]["code"]) == (404, "not_found") and "connection" not in headers
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{WEBSOCKET}\r\n".encode())
            assert read_response(sock)[0] == 200
            sock.sendall(HEALTHZ)
            assert read_response(sock)[0] == 200
            for upgrade in (WEBSOCKET, "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"):
                bodied = connect(url)
                bodied.sendall(f"{DETECT_HEAD}{upgrade}Content-Length: {len(IMAGE)}\r\n\r\n".encode())
                bodied.sendall(IMAGE)
                status, headers, body = read_response(bodied)
                assert (status, body["error"]["code"], headers["connection"]) == (400, "bad_request", "close")
                assert "Upgrade" in body["error"]["message"]
        finally:
            logging.getLogger("uvicorn.error").removeHandler(catcher)
    assert not warnings, [r.getMessage() for r in warnings]


def test_a_body_dropped_after_an_early_answer_is_not_counted_as_the_next_headers():
    """The app may answer before it reads a body (401, 404, an OIP flood's 413): uvicorn drops the rest,
    and the next request on the connection is served, even when its headers come in several packets
    (the dropped bytes were counted as its header bytes: 431)."""
    with serving(create_app(settings(**LIMITS), loader=standin_loader())) as (url, _):
        sock = connect(url)
        body = b"x" * 100_000
        sock.sendall(
            f"POST /v2/models/nothere/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        assert read_response(sock)[0] == 404
        sock.sendall(body)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)  # not to wait for anything: so that the server reads the first line alone
        sock.sendall(b"Host: x\r\n\r\n")
        assert read_response(sock)[0] == 200
