"""POST /v2/models/{name}/infer: Open Inference Protocol v2 (KServe v2, Triton HTTP) inference.

The images go through exactly what ``/detect/batch`` does: the same upload checks (``read_images``), the
same batcher (``run_detection``) and the same selection and pixel mapping (``detection_dicts``); only
the envelope differs (``service.oip``). Errors here are the protocol's ``{"error": "<message>"}`` with the
same status codes as ``/detect``, the API key's 401 included, so Triton and KServe clients can read them:
anything the codec raises on a body is that body's fault (400), anything else a bug (500, logged), and
neither closes the connection. The body is parsed in a worker thread, within the codec's limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import oip
from service.bounded_json import JsonRejected, ValueCount
from service.errors import ServiceError
from service.http_errors import AnsweringRoute
from service.routes.deps import api_key_dependencies, get_state
from service.routes.detect import detection_dicts, parse_classes, record_stages, run_detection
from service.routes.health import describe_model
from service.routes.uploads import Upload, read_images
from service.settings import Settings
from service.state import ServiceState

PARAMETERS_SCHEMA = {  # the protocol's: each value a string, number or boolean
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"], "maxLength": oip.MAX_TEXT},
}
TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": [oip.INPUT]},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
        "data": {"type": "array", "items": {"type": "string", "format": "byte"}},
        "parameters": {**PARAMETERS_SCHEMA, "properties": {"binary_data_size": {"type": "integer"}}},
    },
}
REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "maxLength": oip.MAX_TEXT},
        "inputs": {"type": "array", "items": TENSOR_SCHEMA, "minItems": 1, "maxItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": list(oip.OUTPUTS)},
                    "parameters": {
                        **PARAMETERS_SCHEMA,
                        "properties": {"binary_data": {"type": "boolean"}},
                    },
                },
            },
        },
        "parameters": {
            **PARAMETERS_SCHEMA,
            "properties": {
                "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                "max_detections": {"type": "integer", "minimum": 1},
                "classes": {"type": "string"},
                "binary_data_output": {"type": "boolean"},
            },
        },
    },
}


log = logging.getLogger("refinedet.service")


def router(settings: Settings) -> APIRouter:
    api = APIRouter(
        tags=["kserve-v2"], dependencies=api_key_dependencies(settings), route_class=AnsweringRoute
    )

    @api.post(
        "/v2/models/{name}/infer",
        responses={
            200: {"description": "output tensors boxes, scores, labels, count (see /v2/models/{name})"},
            **{c: {"description": "{'error': message}"} for c in (400, 401, 404, 413, 415, 422, 503, 504)},
        },
        summary="Detect objects (Open Inference Protocol v2)",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}}
        },
    )
    async def infer(request: Request, name: str) -> Response:
        """Input `image` BYTES [N]: encoded images (base64 in JSON, raw with the binary tensor extension).
        Outputs `boxes` FP32 [N,K,4] (pixels), `scores` FP32 [N,K], `labels` INT32 [N,K] (0-based index into
        the model's classes, -1 for padding), `count` INT32 [N]. Parameters: `score_threshold`,
        `max_detections`, `classes` (as /detect)."""
        start = time.perf_counter()
        state = get_state(request)
        model_name = describe_model(state, name)["name"]
        _, batcher = state.require_ready()  # before the body is read: not ready answers 503 at once
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise ServiceError(415, "unsupported_encoding", "compressed inference requests are not supported")
        parsed = await read_request(request, state.settings.max_images_per_request)
        threshold, max_detections, class_mask = options(parsed.parameters, state)
        uploads = [Upload(data, None) for data in parsed.images]
        decoded = await read_images(uploads, state.settings, state.decoding)
        filenames: list[str | None] = [None] * len(uploads)
        results = await run_detection(state, request, batcher, [image for image, _ in decoded], filenames)
        names = state.detector.config.class_names if state.detector else ()
        per_image = []
        for (image, decode_ms), (result, queue_ms) in zip(decoded, results, strict=True):
            per_image.append(
                detection_dicts(
                    result, image.width, image.height, names, threshold, class_mask, max_detections
                )
            )
            observe(state, result, decode_ms, queue_ms, start, len(per_image[-1]))
        content, header_length = oip.encode_response(model_name, parsed, oip.detection_tensors(per_image))
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={oip.HEADER_LENGTH: str(header_length)},
        )

    return api


async def read_request(request: Request, max_images: int) -> oip.InferRequest:
    """The request's body, parsed by the codec in a worker thread (not on the event loop); whatever the
    codec raises other than its 4xx is a check it lacks, so the body's fault: 400 (and logged)."""
    header_length = request.headers.get(oip.HEADER_LENGTH)
    body = await read_counted(request, oip.json_count(header_length))
    try:
        return await asyncio.to_thread(oip.parse_request, body, header_length, max_images)
    except ServiceError:
        raise
    except Exception as exc:
        log.error("the OIP codec failed on a request body (a check it lacks)", exc_info=exc)
        raise oip.bad("the inference request is malformed") from None


async def read_counted(request: Request, count: ValueCount) -> bytes:
    """The body, its JSON values counted as it arrives: a flood of values is answered 413 after its first
    chunks, and the server drops the rest of it without the app."""
    chunks = []
    try:
        async for chunk in request.stream():
            count.feed(chunk)
            chunks.append(chunk)
    except JsonRejected as exc:
        raise oip.rejected(exc) from None
    return b"".join(chunks)


def options(parameters: dict[str, Any], state: ServiceState) -> tuple[float, int, Any]:
    """(score threshold, max detections, class mask) from the request's parameters, as /detect's query."""
    s = state.settings
    threshold = parameters.get("score_threshold", s.default_score_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise ServiceError(
            422, "invalid_request", f"score_threshold must be a number in [0, 1], got {threshold!r}"
        )
    limit = parameters.get("max_detections", s.max_detections)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= s.max_detections:
        raise ServiceError(
            422,
            "invalid_request",
            f"max_detections must be an integer in [1, {s.max_detections}], got {limit!r}",
        )
    classes = parameters.get("classes")
    if classes is not None and not isinstance(classes, str):
        raise ServiceError(422, "invalid_request", "classes must be a string of comma-separated class names")
    return float(threshold), limit, parse_classes([classes] if classes else None, state)


def observe(
    state: ServiceState, result: Any, decode_ms: float, queue_ms: float, start: float, found: int
) -> None:
    record_stages(state, result, decode_ms, queue_ms, start, found)
