"""uvicorn's httptools protocol with the limits a public-facing server needs before any request reaches the
app (uvicorn has none of them for httptools):

- ``max_connections``: a connection opened beyond the cap is answered 503 (JSON, ``Retry-After``) and
  closed at once, without reading a request.
- ``max_header_bytes``: a request line plus headers longer than this is answered 431 and the connection
  closed, checked as the bytes arrive (so a client cannot make the parser buffer megabytes of headers).
- ``header_timeout_s``: a connection that sends nothing, or a request whose headers are not complete
  within this many seconds of its first byte (slowloris), is closed (408 when part of a request came).
- A malformed request is answered 400 in the service's JSON error format (uvicorn's is plain text).

Every answer here is ``{"error": {"code", "message"}}`` with ``Connection: close``; details go to the log.
Body limits and timeouts are the app's (``service.middleware``).

uvicorn builds a protocol per connection from its config alone, and a class given to worker processes must
be importable by name, so the limits come from the app: its lifespan state (``scope["state"]``, shared
with the protocols) holds ``HttpLimits`` under ``LIMITS_KEY``. It also holds, under ``DRAIN_KEY``, the
app's ``begin_drain()``, which this protocol calls when uvicorn starts a graceful shutdown (uvicorn calls
``shutdown()`` on every open connection first thing), so the app learns of the drain at its start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("refinedet.service")
LINGER_S = 1.0  # after an early answer, how long unread request bytes are discarded before closing
IDLE_RECHECK_S = 1.0  # a connection idle at its header timeout is closed if still idle this much later


LIMITS_KEY = "refinedet.http_limits"
DRAIN_KEY = "refinedet.begin_drain"


@dataclass(frozen=True)
class HttpLimits:
    """What ``LimitedHttpToolsProtocol`` enforces (defaults: the settings' defaults)."""

    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0


def error_bytes(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response in the service's JSON error format, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


TOO_MANY_CONNECTIONS = error_bytes(
    503, "Service Unavailable", "overloaded", "too many open connections; retry shortly", retry_after=1
)
HEADERS_TOO_LARGE = error_bytes(
    431, "Request Header Fields Too Large", "headers_too_large", "the request headers are too large"
)
HEADER_TIMEOUT = error_bytes(
    408, "Request Timeout", "request_timeout", "the request headers did not arrive in time"
)
BAD_REQUEST = error_bytes(400, "Bad Request", "bad_request", "malformed HTTP request")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: HttpLimits = self.app_state.get(LIMITS_KEY) or HttpLimits()
        self._header_bytes = 0  # bytes of the current request's line and headers so far
        self._in_headers = False  # between a request's first byte and its complete headers
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered here: discard whatever else arrives
        self._idle_strike = False  # the idle timer fired once with nothing read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning(
                "connection refused: %d open (cap %d)", len(self.connections), self.limits.max_connections
            )
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers or self.cycle is None or self.cycle.response_complete:
            self._header_bytes += len(data)  # (a chunk may hold body bytes too: never fewer)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                self._refuse(HEADERS_TOO_LARGE)
            else:
                log.info("malformed HTTP request: %s", exc)
                self._refuse(BAD_REQUEST)
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(HEADERS_TOO_LARGE)

    def _upgrade(self) -> None:
        if self._should_upgrade():
            self.handle_websocket_upgrade()
        else:
            self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._idle_strike = False
        self._arm_header_timer()  # the headers must be complete this long after their first byte

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            raise _HeadersTooLarge()  # stops the parser; data_received answers 431
        super().on_headers_complete()

    def shutdown(self) -> None:
        begin_drain = self.app_state.get(DRAIN_KEY)
        if begin_drain is not None:
            begin_drain()  # idempotent: called once per open connection
        super().shutdown()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._header_bytes = 0

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._in_headers and self._header_bytes:
            self._refuse(HEADER_TIMEOUT)
        elif self.cycle is None and not self._idle_strike:
            # Nothing read yet. uvloop runs due timers before it polls the sockets, so after a stall of
            # the event loop the request may be waiting unread: look once more after the next poll.
            self._idle_strike = True
            self._header_timer = self.loop.call_later(IDLE_RECHECK_S, self._header_timeout)
        elif self.cycle is None:  # opened and never sent a byte
            log.debug("closing a connection that sent nothing")
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` and close; unread request bytes are discarded for up to LINGER_S first, so
        the close does not reset the connection before the client has read the answer."""
        self._refused = True
        self._in_headers = False
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(response)
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:
            transport.close()
            return
        self.loop.call_later(LINGER_S, transport.close)


class _HeadersTooLarge(Exception):
    pass
