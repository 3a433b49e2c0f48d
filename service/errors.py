"""Every error leaves the service as ``{"error": {"code", "message"}}`` with a fitting status (under ``/v2``,
the Open Inference Protocol's ``{"error": "message"}``), written here and nowhere else.

- ``error_body`` is the one JSON body, its shape chosen by the request's path (compact UTF-8, byte for byte
  what FastAPI's ``JSONResponse`` writes);
- ``ServiceError`` is an answer to raise or send: status, a stable machine-readable code, a message for
  people, headers;
- each refusal has one builder: ``overloaded`` (at capacity now: retry shortly), ``shutting_down`` (retry
  on another instance), ``not_ready`` (loading, or the load failed), ``unavailable`` (no replica left)
  and ``payload_too_large`` (a body over the limit);
- ``send_error`` writes one to an ASGI ``send``.

No framework here, so that the HTTP protocol (``service.protocol``), the middleware (``service.admission``,
``service.middleware``), the app's error handlers (``service.http_errors``) and the Ray Serve ingress
(``scaleout.serve``) all answer with these. Bad input is a ``ServiceError`` raised where the HTTP layer
finds it; what the compute path raises (an unusable image, the batcher's refusals) becomes one in
``service.http_errors.http_error``, the one mapping.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

RETRY_SOON_S = 1  # Retry-After of a refusal that a retry may soon get past
RETRY_LOADING_S = 5  # Retry-After while the model loads


class ServiceError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a message for people."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self, path: str = "") -> bytes:
        """Its JSON body for a request to ``path`` (``error_body``)."""
        return error_body(self.code, self.message, path)

    def header_items(self) -> list[tuple[bytes, bytes]]:
        """Its response headers as ASGI has them (lower-case bytes), the content type first; without the
        length (``response_headers`` adds it)."""
        return [(b"content-type", b"application/json")] + [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()
        ]

    def response_headers(self, close: bool = False, path: str = "") -> list[tuple[bytes, bytes]]:
        """Every header of its complete response to ``path``: content type, length, its own, and
        ``Connection: close`` when ``close``."""
        content_type, *own = self.header_items()
        length = (b"content-length", b"%d" % len(self.body(path)))
        return [content_type, length, *own, *([(b"connection", b"close")] if close else [])]

    def with_message(self, message: str) -> ServiceError:
        return ServiceError(self.status, self.code, message, self.headers)


def error_body(code: str, message: str, path: str = "") -> bytes:
    """The JSON error body for a request to ``path``: the service's ``{"error": {"code", "message"}}``, or
    under ``/v2`` (the Open Inference Protocol's routes, KServe v2) the protocol's ``{"error": message}``,
    whatever refused it (a route, admission, the body limit, an unknown path or method)."""
    if is_oip(path):
        return json.dumps({"error": message}, separators=(",", ":")).encode()  # ASCII: any message fits
    error = {"error": {"code": code, "message": message}}
    return json.dumps(error, ensure_ascii=False, separators=(",", ":")).encode()


def is_oip(path: str) -> bool:
    """Whether ``path`` is one of the Open Inference Protocol's (``/v2``, ``/v2/...``)."""
    return path == "/v2" or path.startswith("/v2/")


def overloaded(reason: str, retry_after_s: int = RETRY_SOON_S) -> ServiceError:
    """503 ``overloaded``: at capacity for now (``reason`` says what is), a retry soon may be served."""
    return ServiceError(503, "overloaded", f"{reason}; retry shortly", {"Retry-After": str(retry_after_s)})


def shutting_down() -> ServiceError:
    """503 ``shutting_down``: this instance stops serving; another one may."""
    return ServiceError(
        503,
        "shutting_down",
        "the service is shutting down; retry on another instance",
        {"Retry-After": str(RETRY_SOON_S)},
    )


def not_ready(failed: bool) -> ServiceError:
    """503 ``not_ready``: the model is still loading (retry after a while), or its load ``failed`` (for
    good: no Retry-After; the reason is in the log only)."""
    if failed:
        return ServiceError(503, "not_ready", "the model failed to load; see the service log")
    return ServiceError(503, "not_ready", "the model is still loading", {"Retry-After": str(RETRY_LOADING_S)})


def unavailable(reason: str) -> ServiceError:
    """503 ``unavailable``: nothing could serve the request (``reason``); a retry soon may find something."""
    return ServiceError(503, "unavailable", f"{reason}; retry shortly", {"Retry-After": str(RETRY_SOON_S)})


def payload_too_large(limit_bytes: int, close: bool = False) -> ServiceError:
    """413 ``payload_too_large``: a request body over ``limit_bytes`` (``close``: the connection closes after
    the answer, with whatever of the body is still unread)."""
    message = f"request body is larger than the {limit_bytes}-byte limit"
    return ServiceError(413, "payload_too_large", message, {"Connection": "close"} if close else None)


Send = Callable[[dict[str, Any]], Awaitable[None]]  # an ASGI send


async def send_error(send: Send, error: ServiceError, path: str, close: bool = False) -> None:
    """``error`` as a complete response to a request for ``path``, straight to the ASGI server (``close``:
    with Connection: close)."""
    headers = error.response_headers(close, path)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error.body(path)})
