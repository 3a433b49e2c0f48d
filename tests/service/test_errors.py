"""The service's error answers (service/errors.py, service/http_errors.py): one body, byte for byte what the
app's JSON responses are, from every writer; one builder per refusal; and the one mapping from what the
compute path raises to status and code."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.responses import JSONResponse

from service.batcher import ClientGone, QueueFull, ShuttingDown, TooLate
from service.errors import (
    ServiceError,
    error_body,
    not_ready,
    overloaded,
    send_error,
    shutting_down,
    unavailable,
)
from service.http_errors import http_error
from service.imaging import ImageProblem, UnusableImage
from service.protocol import closing_response


def test_the_body_is_what_a_json_response_writes():
    for message in ("plain", "file 0 (photo ü.jpg): naïve — “quoted”"):
        want = JSONResponse({"error": {"code": "invalid_image", "message": message}}).body
        assert error_body("invalid_image", message) == want


def test_each_refusal_has_its_code_and_retry_after():
    cases = {
        overloaded("the service is at capacity (expected wait 3.0 s)", 4): (
            "overloaded",
            "the service is at capacity (expected wait 3.0 s); retry shortly",
            {"Retry-After": "4"},
        ),
        shutting_down(): (
            "shutting_down",
            "the service is shutting down; retry on another instance",
            {"Retry-After": "1"},
        ),
        not_ready(failed=False): ("not_ready", "the model is still loading", {"Retry-After": "5"}),
        not_ready(failed=True): ("not_ready", "the model failed to load; see the service log", {}),
        unavailable("no replica could serve the request (ActorDiedError)"): (
            "unavailable",
            "no replica could serve the request (ActorDiedError); retry shortly",
            {"Retry-After": "1"},
        ),
    }
    for error, (code, message, headers) in cases.items():
        assert (error.status, error.code, error.message, error.headers) == (503, code, message, headers)


def test_under_v2_the_body_is_the_open_inference_protocols():
    """KServe v2 clients read ``{"error": message}``: every /v2 path gets that shape, every other the service's."""
    error = overloaded("too many open connections")
    for path in ("/v2", "/v2/models/m/infer", "/v2/nope"):
        assert json.loads(error.body(path)) == {"error": error.message}, path
    for path in ("", "/detect", "/v2x", "/v1/model"):
        assert json.loads(error.body(path)) == {"error": {"code": "overloaded", "message": error.message}}, (
            path
        )
    headers = dict(error.response_headers(path="/v2/models/m/infer"))
    assert headers[b"content-length"] == str(len(error.body("/v2/models/m/infer"))).encode()


def test_every_writer_sends_the_same_body_and_headers():
    error = overloaded("too many open connections")
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(send_error(send, error, "/detect", close=True))
    start, body = sent
    assert start["status"] == 503 and body["body"] == error.body()
    assert start["headers"] == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(error.body())).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    raw = closing_response(error)
    head, payload = raw.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable" and payload == error.body()
    assert head.split(b"\r\n")[1:] == [b"%s: %s" % pair for pair in start["headers"]]


@pytest.mark.parametrize(
    ("problem", "status"),
    [
        (ImageProblem.EMPTY, 400),
        (ImageProblem.INVALID, 400),
        (ImageProblem.UNSUPPORTED_FORMAT, 415),
        (ImageProblem.UNSUPPORTED_MEDIA_TYPE, 415),
        (ImageProblem.TOO_LARGE, 413),
        (ImageProblem.TOO_SMALL, 422),
    ],
)
def test_an_unusable_image_is_answered_with_its_status_and_code(problem, status):
    error = http_error(UnusableImage(problem, "why"))
    assert error is not None and (error.status, error.code, error.message) == (status, problem.value, "why")


def test_the_batchers_refusals_are_answered_as_the_route_did():
    answers = {
        QueueFull("8 requests are already queued"): (
            503,
            "overloaded",
            "the service is at capacity (8 requests are already queued); retry shortly",
        ),
        TooLate("late"): (
            503,
            "overloaded",
            "the service could not reach this request before its deadline; retry shortly",
        ),
        ShuttingDown("stop"): (
            503,
            "shutting_down",
            "the service is shutting down; retry on another instance",
        ),
        ClientGone("gone"): (499, "client_closed_request", "client disconnected before inference"),
    }
    for exc, want in answers.items():
        error = http_error(exc)
        assert error is not None and (error.status, error.code, error.message) == want, exc
    own = ServiceError(404, "model_not_found", "no such model")
    assert http_error(own) is own
    assert http_error(ValueError("a bug")) is None and http_error(RuntimeError()) is None
