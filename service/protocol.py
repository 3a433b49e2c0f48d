"""uvicorn's httptools protocol with the limits a public-facing server needs before any request reaches the
app (uvicorn has none of them for httptools):

- ``max_connections``: a connection opened beyond the cap is answered 503 (JSON, ``Retry-After``) and
  closed at once, without reading a request.
- ``max_header_bytes``: a request line plus headers longer than this is answered 431 and the connection
  closed, checked as the bytes arrive (so a client cannot make the parser buffer megabytes of headers).
- ``header_timeout_s``: a connection that sends nothing, or a request whose headers are not complete
  within this many seconds of its first byte (slowloris), is closed (408 when part of a request came).
- A malformed request is answered 400 in the service's JSON error format (uvicorn's is plain text).
- An ``Upgrade`` (WebSocket, h2c) is ignored, as RFC 9110 (7.8) lets a server: the service has no WebSocket
  routes, so uvicorn runs without a WebSocket implementation (``ws="none"``, ``service.server``) and the
  request is served as plain HTTP, without uvicorn's two warnings a request. One with a body is answered
  400 instead: httptools takes whatever follows its headers for the new protocol's bytes, so its body would
  never reach the app.

Every answer here is ``{"error": {"code", "message"}}`` with ``Connection: close``; details go to the log.
Body limits and timeouts are the app's (``service.middleware``).

Early answers: where uvicorn would start a request's ASGI task (its headers complete, every request before
it on the connection answered), the app's hook may answer it instead (``service.middleware.early_refusals``:
admission control's 503). The answer is written at once, from the parser's callback, so a refusal does not
wait behind the event loop's queue of app tasks. The request's body is then read and dropped as it arrives
(at most ``max_body_bytes``, pausing at most ``body_timeout_s``, else the connection is closed), after
which the connection serves its next request, or closes if the request asked to (half-closed at the
answer, so the client sees its end at once). A client waiting for ``100 Continue``, or declaring a body
over the limit, gets the answer with ``Connection: close``, and the connection closes after a linger.

Shutdown: uvicorn closes every connection with no request under way at once. A connection that has not
completed its first request yet was accepted just as the server began to stop, and its request is on its
way (the client has nothing to retry on: it never got an answer): it is kept for its first request (up to
``FIRST_REQUEST_WAIT_S``, then closed as an idle one), which is answered (served or refused, as the
drain decides) with ``Connection: close``. So is a connection accepted after the shutdown began.

uvicorn builds a protocol per connection from its config alone, and a class given to worker processes must
be importable by name, so the limits come from the app: its lifespan state (``scope["state"]``, shared
with the protocols) holds ``HttpLimits`` under ``LIMITS_KEY``. It also holds, under ``DRAIN_KEY``, the
app's ``begin_drain()``, which this protocol calls when uvicorn starts a graceful shutdown (uvicorn calls
``shutdown()`` on every open connection first thing), so the app learns of the drain at its start; and,
under ``EARLY_KEY``, the early-answer hook.

This builds on uvicorn's internals: it overrides private methods (``_start_asgi_task``, the hook of the
early answers), rewrites ``data_received`` and reads the protocol's and the request cycle's attributes.
pyproject.toml pins the uvicorn (and httptools) range it was tested on; tests/service/test_protocol_fence.py
records every uvicorn name used here with its signature and fails, naming it, when one moves; and a
uvicorn without the private methods fails this import (``UVICORN_PRIVATE``) instead of serving without
its limits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service.errors import ServiceError, overloaded

# uvicorn's private methods used here (the fence test records their signatures).
UVICORN_PRIVATE = (
    "_start_asgi_task",
    "_unset_keepalive_if_required",
    "_should_upgrade",
)

log = logging.getLogger("refinedet.service")
LINGER_S = 1.0  # after an answer that closes, how long unread request bytes are discarded before closing
IDLE_RECHECK_S = 1.0  # a connection idle at its header timeout is closed if still idle this much later
FIRST_REQUEST_WAIT_S = 1.0  # at shutdown, how long a connection's first request is waited for


LIMITS_KEY = "refinedet.http_limits"
DRAIN_KEY = "refinedet.begin_drain"
EARLY_KEY = "refinedet.early_answer"
STOPPING_KEY = "refinedet.server_stopping"  # set by the protocols once the server began shutting down


@dataclass(frozen=True)
class HttpLimits:
    """What ``LimitedHttpToolsProtocol`` enforces (defaults: the settings' defaults); the body limits apply
    to the bodies it drops after an early answer."""

    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024
    body_timeout_s: float = 10.0


@dataclass(frozen=True)
class EarlyAnswer:
    """A complete response the app gives a request from its headers alone (``EARLY_KEY``); the protocol
    adds its default headers (date, server), the length and, when it closes, ``Connection: close``."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


EarlyHook = Callable[[Any], EarlyAnswer | None]  # (the request's ASGI scope) -> answer or None


def closing_response(error: ServiceError) -> bytes:
    """``error`` as a complete HTTP/1.1 response that closes the connection."""
    head = [name + b": " + value + b"\r\n" for name, value in error.response_headers(close=True)]
    return b"".join([STATUS_LINE[error.status], *head, b"\r\n", error.body()])


TOO_MANY_CONNECTIONS = closing_response(overloaded("too many open connections"))
HEADERS_TOO_LARGE = closing_response(
    ServiceError(431, "headers_too_large", "the request headers are too large")
)
HEADER_TIMEOUT = closing_response(
    ServiceError(408, "request_timeout", "the request headers did not arrive in time")
)
BAD_REQUEST = closing_response(ServiceError(400, "bad_request", "malformed HTTP request"))
UPGRADE_WITH_BODY = closing_response(
    ServiceError(400, "bad_request", "Upgrade is not supported here; send the request without it")
)


def _check_uvicorn() -> None:
    missing = [name for name in UVICORN_PRIVATE if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        import uvicorn

        raise ImportError(
            f"uvicorn {uvicorn.__version__} has no HttpToolsProtocol.{', .'.join(missing)}, which "
            "service.protocol builds on: install the uvicorn release pyproject.toml pins"
        )


_check_uvicorn()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: HttpLimits = self.app_state.get(LIMITS_KEY) or HttpLimits()
        self._header_bytes = 0  # bytes of the current request's line and headers so far
        self._in_headers = False  # between a request's first byte and its complete headers
        self._in_message = False  # between a request's first byte and the end of its body
        self._timer: asyncio.TimerHandle | None = None  # header, idle or dropped-body timeout
        self._refused = False  # answered here: discard whatever else arrives
        self._idle_strike = False  # the idle timer fired once with nothing read
        self.early: EarlyHook | None = self.app_state.get(EARLY_KEY)
        self._dropping: RequestResponseCycle | None = None  # answered early; its body is being dropped
        self._dropped = 0  # body bytes of ``_dropping`` so far
        self._last = False  # the server is stopping: this connection's next request is its last

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning(
                "connection refused: %d open (cap %d)", len(self.connections), self.limits.max_connections
            )
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        if self.app_state.get(STOPPING_KEY):  # accepted as the server began shutting down
            self._await_last_request()
        else:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Header bytes: a chunk in headers, or one after a request was read and answered (the next request's,
        # maybe with body bytes: counted too). Not the body of a request answered before it was read (the
        # app's 401, 413...): that is dropped. The chunk ending such a body is not counted; the next are,
        # and on_headers_complete checks the exact size.
        if self._in_headers or (
            not self._in_message and (self.cycle is None or self.cycle.response_complete)
        ):
            self._header_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
            return
        except httptools.HttpParserError as exc:
            if self._refused:  # stopped on purpose (_StopParsing): the connection is closing already
                return
            if isinstance(exc.__context__, _HeadersTooLarge):
                self._refuse(HEADERS_TOO_LARGE)
            else:
                log.info("malformed HTTP request: %s", exc)
                self._refuse(BAD_REQUEST)
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(HEADERS_TOO_LARGE)

    def _upgrade(self) -> None:
        if self._should_upgrade():  # only when run with a WebSocket implementation (not the service's way)
            self.handle_websocket_upgrade()
        # else: the request was served as plain HTTP (the module docstring), and needs no warning

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = self._in_message = True
        self._idle_strike = False
        self._arm_header_timer()  # the headers must be complete this long after their first byte

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_timer()
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            raise _HeadersTooLarge()  # stops the parser; data_received answers 431
        if self.parser.should_upgrade() and not self._should_upgrade() and self._declares_body():
            self._refuse(UPGRADE_WITH_BODY)  # its body would be taken for the new protocol's bytes
            raise _StopParsing()
        super().on_headers_complete()

    def _declares_body(self) -> bool:
        return any(
            name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0"))
            for name, value in self.headers
        )

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Where uvicorn starts a request's app (headers complete, nothing before it still unanswered on
        this connection): the early hook answers it instead, or the app starts."""
        if self._last:
            cycle.keep_alive = False
        answer = self.early(cycle.scope) if self.early is not None and app is self.app else None
        if answer is None:
            super()._start_asgi_task(cycle, app)
        else:
            self._answer_early(cycle, answer)

    def _answer_early(self, cycle: RequestResponseCycle, answer: EarlyAnswer) -> None:
        """Write ``answer`` for ``cycle``'s request now; then drop its body, or close (module docstring)."""
        cycle.response_complete = True  # from here uvicorn's parser callbacks ignore its body
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            return
        headers = dict(cycle.scope["headers"])
        declared = headers.get(b"content-length", b"0")
        over = not declared.isdigit() or int(declared) > self.limits.max_body_bytes
        if cycle.waiting_for_100_continue or over:  # no body to wait for, or one too large to take
            self._refuse(self._render(answer, close=True))
            return
        close = not cycle.keep_alive
        self.transport.write(self._render(answer, close))
        if close and not self._send_eof():
            return
        if cycle.more_body:  # the rest of the body is dropped as it arrives (on_body)
            self._dropping, self._dropped = cycle, 0
            self._arm_timer(self.limits.body_timeout_s, self._body_stalled)
        else:
            self._finish_early(cycle)

    def _render(self, answer: EarlyAnswer, close: bool) -> bytes:
        """The response's bytes, as uvicorn would write them (its default headers first)."""
        head = [STATUS_LINE[answer.status]]
        for name, value in [*self.server_state.default_headers, *answer.headers]:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-length: %d\r\n" % len(answer.body))
        if close:
            head.append(b"connection: close\r\n")
        return b"".join([*head, b"\r\n", answer.body])

    def _finish_early(self, cycle: RequestResponseCycle) -> None:
        """The early-answered request was read to its end: close, or go on as after any response."""
        self._dropping = None
        self._cancel_timer()
        if not cycle.keep_alive:
            self.transport.close()
        else:
            self.on_response_complete()

    def _body_stalled(self) -> None:
        self._timer = None
        self._dropping = None
        self._linger_close()

    def on_body(self, body: bytes) -> None:
        if self._dropping is None:
            super().on_body(body)
            return
        self._dropped += len(body)
        if self._dropped > self.limits.max_body_bytes:
            self._dropping = None
            self._linger_close()
            raise _StopParsing()
        self._arm_timer(self.limits.body_timeout_s, self._body_stalled)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._dropping is None:
            super().on_message_complete()
        else:
            self._finish_early(self._dropping)

    def shutdown(self) -> None:
        begin_drain = self.app_state.get(DRAIN_KEY)
        if begin_drain is not None:
            begin_drain()  # idempotent: called once per open connection
        self.app_state[STOPPING_KEY] = True
        if self.cycle is None and not self._refused and not self.transport.is_closing():
            self._await_last_request()  # its first request is on its way: answer it (module docstring)
            return
        super().shutdown()

    def _await_last_request(self) -> None:
        """The server is stopping and this connection has not completed its first request: answer that one
        request, then close; close it if it has not come in ``FIRST_REQUEST_WAIT_S``."""
        self._last = True
        self._arm_timer(min(FIRST_REQUEST_WAIT_S, self.limits.header_timeout_s), self._header_timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._header_bytes = 0

    def _arm_header_timer(self) -> None:
        self._arm_timer(self.limits.header_timeout_s, self._header_timeout)

    def _arm_timer(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay_s, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_headers and self._header_bytes:
            self._refuse(HEADER_TIMEOUT)
        elif self.cycle is None and not self._idle_strike:
            # Nothing read yet. uvloop runs due timers before it polls the sockets, so after a stall of
            # the event loop the request may be waiting unread: look once more after the next poll.
            self._idle_strike = True
            self._timer = self.loop.call_later(IDLE_RECHECK_S, self._header_timeout)
        elif self.cycle is None:  # opened and never sent a byte
            log.debug("closing a connection that sent nothing")
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` and close; unread request bytes are discarded for up to LINGER_S first, so
        the close does not reset the connection before the client has read the answer."""
        if not self.transport.is_closing():
            self.transport.write(response)
        self._linger_close()

    def _linger_close(self) -> None:
        """Send no more, discard what arrives for up to LINGER_S (or until the client closes), then close."""
        self._refused = True
        self._in_headers = False
        self._cancel_timer()
        self._unset_keepalive_if_required()
        if self._send_eof():
            self.loop.call_later(LINGER_S, self.transport.close)

    def _send_eof(self) -> bool:
        """Half-close: the client sees the end of the answer at once, while what it still sends is read.
        False if the connection is closed (or closing) instead."""
        transport = self.transport
        if transport.is_closing():
            return False
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None and not transport.get_write_buffer_size():
                # uvloop's write_eof() sends its FIN at the loop's next poll of this socket, after every
                # other callback and task ready now (under a burst, tens of ms later): send it now.
                raw = socket.socket(sock.family, sock.type, fileno=sock.fileno())
                try:
                    raw.shutdown(socket.SHUT_WR)
                finally:
                    raw.detach()  # the transport still owns (and closes) the descriptor
            elif transport.can_write_eof():
                transport.write_eof()  # after what is still buffered
        except OSError:
            transport.close()
            return False
        return True


class _HeadersTooLarge(Exception):
    pass


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing a connection that is being closed."""
