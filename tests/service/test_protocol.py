"""The HTTP protocol's limits (service/protocol.py) and the body timeout, under a real uvicorn server with
the options ``refinedet serve`` uses: oversized headers get 431, idle and slow connections are closed
(408 when part of a request came), connections beyond the cap get 503, malformed requests get JSON 400;
every answer is the service's JSON error format."""

from __future__ import annotations

import socket

from service_testing import connect, poll, read_response, serving, settings, standin_loader

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
