"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnect detection keep working).

- ``RequestContextMiddleware``: request id (the client's ``X-Request-ID`` if sane, else a new one; echoed
  back), in-flight gauge, and through ``RequestLog`` the request count by route/method/status, latency
  histogram and one JSON access log line per request.
  A request answered before routing (413 from Content-Length, 503 from admission) is counted under the
  route its path matches, so every route's counts are complete.
- ``early_refusals``: admission at the HTTP layer (``service.protocol``), recorded by the same
  ``RequestLog``.
- ``BodyLimitMiddleware``: 413 for bodies over the limit, from Content-Length when given and by counting
  streamed chunks otherwise, before the body is buffered; 408 when the body pauses longer than
  ``idle_timeout_s`` or is still incomplete at the request's deadline (``service.admission``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import DEADLINE_KEY, Admission
from service.errors import ServiceError, payload_too_large, send_error
from service.metrics import Metrics
from service.protocol import EarlyAnswer

access_log = logging.getLogger("refinedet.access")
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(headers: Headers) -> str:
    given = headers.get(REQUEST_ID_HEADER)
    return given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex


class RequestLog:
    """Where every answered request is recorded: the request count by route/method/status and latency
    histogram (``Metrics``), and one JSON access log line. Used by ``RequestContextMiddleware`` and for
    the answers given at the HTTP layer (``early_refusals``), so both count and log alike.

    A request answered before routing is labelled with the route template its path matches
    (``route_paths()``, the app's routes; ``known_paths`` as they are); a file under a mounted folder
    (``mounts``: Swagger UI's and the page's assets) as ``<mount>/{path}``, so that it is not counted as
    ``unmatched`` and the labels stay bounded. ``prepare()`` builds the patterns
    at startup: their first use would otherwise generate the OpenAPI schema on the event loop, a
    ~0.1-0.2 s stall of every connection in the middle of the first burst refused.
    """

    def __init__(
        self,
        metrics: Metrics,
        log_requests: bool = True,
        known_paths: frozenset[str] = frozenset(),
        route_paths: Callable[[], Iterable[str]] = tuple,
        mounts: Iterable[str] = (),
    ) -> None:
        self.metrics = metrics
        self.log_requests = log_requests
        self.known_paths = known_paths  # non-API routes (docs) that may be metric labels as they are
        self._route_paths = route_paths
        self.mounts = tuple(m.rstrip("/") + "/" for m in mounts)
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def prepare(self) -> None:
        """Build the route patterns now (once every route is registered), not on first use."""
        if self._patterns is None:
            self._patterns = [(template_pattern(t), t) for t in self._route_paths()]

    def record(self, scope: Scope, request_id: str, status: int, elapsed: float, sent: int) -> None:
        """Count and log one answered request (``elapsed`` seconds, ``sent`` body bytes)."""
        route = getattr(scope.get("route"), "path", None) or self.route_label(scope)
        self.metrics.observe_request(route, scope["method"], status, elapsed)
        if self.log_requests:
            self._log(scope, request_id, status, elapsed, sent)

    def route_label(self, scope: Scope) -> str:
        path = scope["path"]
        if path in self.known_paths:
            return path
        mount = next((m for m in self.mounts if path.startswith(m)), None)
        if mount is not None:
            return mount + "{path}"
        self.prepare()
        assert self._patterns is not None
        return next((t for pattern, t in self._patterns if pattern.fullmatch(path)), "unmatched")

    @staticmethod
    def _log(scope: Scope, request_id: str, status: int, elapsed: float, sent: int) -> None:
        client = scope.get("client")
        fields = {
            "event": "access",
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1")[:512],
            "status": status,
            "duration_ms": round(elapsed * 1e3, 2),
            "response_bytes": sent,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        access_log.info(
            "%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1e3, extra={"fields": fields}
        )


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, requests: RequestLog) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status, sent = 500, 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        in_flight = self.requests.metrics.in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            in_flight.dec()
            self.requests.record(scope, request_id, status, time.perf_counter() - start, sent)


def early_refusals(admission: Admission, requests: RequestLog) -> Callable[[Scope], EarlyAnswer | None]:
    """The hook ``service.protocol`` calls with each request's scope when its headers are complete, in
    place of starting the app: the admission decision (``Admission.admit``) made there, so that
    a refused request is answered from the protocol callback that parsed its headers (no task, no
    middleware, no body read first) while the requests admitted before it wait for their turn of the
    event loop. A refusal is counted and logged as the middleware would, with its request id (the client
    address logged is the connection's peer: uvicorn applies proxy headers inside the app)."""

    def refuse(scope: Scope) -> EarlyAnswer | None:
        start = time.perf_counter()
        refusal = admission.admit(scope)
        if refusal is None:
            return None
        request_id = request_id_from(Headers(scope=scope))
        body = refusal.body(scope["path"])
        headers = [*refusal.header_items(), (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        requests.record(scope, request_id, refusal.status, time.perf_counter() - start, len(body))
        return EarlyAnswer(refusal.status, headers, body)

    return refuse


def template_pattern(template: str) -> re.Pattern[str]:
    """``/v2/models/{name}`` -> a pattern matching ``/v2/models/<one segment>``."""
    parts = re.split(r"(\{[^}]*\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def body_timeout() -> ServiceError:
    return ServiceError(
        408, "request_timeout", "the request body did not arrive in time", {"Connection": "close"}
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = (
                payload_too_large(self.max_bytes, close=True)
                if declared.isdigit()
                else ServiceError(400, "bad_request", "invalid Content-Length", {"Connection": "close"})
            )
            await send_error(send, error, scope["path"])
            return
        received = 0
        started = False
        complete = False
        deadline = scope.get("state", {}).get(DEADLINE_KEY)

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # only a disconnect is left to hear about: no time limit
                return await receive()
            wait = self.idle_timeout_s
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                raise body_timeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise payload_too_large(self.max_bytes, close=True)
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ServiceError as exc:  # raised past the app's handlers (e.g. while a response streamed)
            if started:
                raise
            await send_error(send, exc, scope["path"])
