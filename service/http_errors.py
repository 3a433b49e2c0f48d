"""Where exceptions become HTTP answers: the app's error handlers, and ``http_error``, the one mapping
from what the compute path raises to the service's errors (``service.errors``).

The compute path knows nothing of HTTP: an upload that cannot be served raises ``UnusableImage`` (its
``ImageProblem``), in the handler's checks or in the engine's decode; the batcher refuses or drops work
with ``QueueFull``, ``ShuttingDown``, ``TooLate`` and ``ClientGone``. The routes let them out and
``http_error`` gives each its status and code (the Open Inference Protocol route too, in its own body
shape). Framework errors (404, 405, validation) are reshaped into the same body. Only a genuine bug reaches
the catch-all (``bug``), which logs the traceback and answers 500 without details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import ClientGone, QueueFull, ShuttingDown, TooLate
from service.errors import ServiceError, overloaded, shutting_down
from service.imaging import ImageProblem, UnusableImage

log = logging.getLogger("refinedet.service")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
IMAGE_STATUS: dict[ImageProblem, int] = {
    ImageProblem.EMPTY: 400,
    ImageProblem.INVALID: 400,
    ImageProblem.UNSUPPORTED_FORMAT: 415,
    ImageProblem.UNSUPPORTED_MEDIA_TYPE: 415,
    ImageProblem.TOO_LARGE: 413,
    ImageProblem.TOO_SMALL: 422,
}
# The compute path's failures -> the answer (the code of an unusable image is its problem's value).
FAILURES: dict[type[Exception], Callable[[Any], ServiceError]] = {
    ServiceError: lambda exc: exc,
    UnusableImage: lambda exc: ServiceError(IMAGE_STATUS[exc.problem], exc.problem.value, exc.message),
    QueueFull: lambda exc: overloaded(f"the service is at capacity ({exc})"),
    TooLate: lambda exc: overloaded("the service could not reach this request before its deadline"),
    ShuttingDown: lambda exc: shutting_down(),
    ClientGone: lambda exc: ServiceError(
        499, "client_closed_request", "client disconnected before inference"
    ),
}


def http_error(exc: BaseException) -> ServiceError | None:
    """The answer for ``exc``, raised by a route or by the compute path under it; None if it is none of
    the service's failures (a bug)."""
    for cls in type(exc).__mro__:
        to_answer = FAILURES.get(cls)
        if to_answer is not None:
            return to_answer(exc)
    return None


def bug(request: Request, exc: BaseException) -> ServiceError:
    """The answer to an exception that is none of the service's failures (a bug): 500 without details; the
    traceback goes to the log."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ServiceError(500, "internal_error", "internal server error (logged with the request id)")


def error_response(error: ServiceError, request: Request) -> Response:
    """``error`` as the answer to ``request`` (the body's shape follows its path: ``errors.error_body``)."""
    return Response(
        error.body(request.url.path),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "header"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def answer(request: Request, exc: Exception) -> Response:
    """The answer to ``exc``, raised while serving ``request``: the service's failures, framework errors
    (404, 405, validation) and, for anything else, ``bug``."""
    if isinstance(exc, RequestValidationError):
        error = ServiceError(422, "invalid_request", _validation_message(exc))
    elif isinstance(exc, StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "error")
        error = ServiceError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
    else:
        error = http_error(exc) or bug(request, exc)
    return error_response(error, request)


class AnsweringRoute(APIRoute):
    """A route that answers its own errors (its dependencies' too) as the app's handlers would (``answer``),
    a bug included: nothing it raises reaches the server-error middleware, which would log it a second time
    and hand it to the server."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answering_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return answer(request, exc)

        return answering_handler


def install_error_handlers(app: FastAPI) -> None:
    for failure in (*FAILURES, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(failure, answer)  # type: ignore[arg-type]
