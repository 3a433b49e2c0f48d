"""POST /detect (one image) and POST /detect/batch (several): check (and decode, unless the engine
decodes the upload: ``service.decoding.UploadDecoding``) -> batcher -> response.

Per-request options are applied to the shared post-processing's output: ``score_threshold`` (strictly
greater, as ``Detections.image``), ``classes`` and ``max_detections``; boxes are mapped to the original
image's pixels with ``model.postprocess.to_pixels``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from model.postprocess import to_pixels
from service.admission import request_deadline
from service.batcher import DynamicBatcher, TooLate
from service.detector import ImageDetections
from service.errors import ServiceError
from service.http_errors import http_error
from service.imaging import DecodedImage, UnusableImage, annotate
from service.routes.deps import api_key_dependencies, get_state
from service.routes.uploads import (
    BATCH_FIELDS,
    SINGLE_FIELDS,
    Upload,
    UploadedImage,
    name_file,
    read_images,
    read_uploads,
    upload_body,
)
from service.schemas import BatchResponse, DetectResponse, ErrorResponse
from service.settings import Settings
from service.state import ServiceState

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503, 504)
}


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["detection"], dependencies=api_key_dependencies(settings))
    max_det = settings.max_detections

    @api.post(
        "/detect",
        response_model=DetectResponse,
        responses={
            **ERRORS,
            200: {
                "content": {"image/jpeg": {}, "image/png": {}},
                "description": "detections, or the annotated image",
            },
        },
        openapi_extra=upload_body(SINGLE_FIELDS, many=False),
        summary="Detect objects in one image",
    )
    async def detect(
        request: Request,
        score_threshold: float = Query(settings.default_score_threshold, ge=0.0, le=1.0),
        max_detections: int = Query(max_det, ge=1, le=max_det),
        classes: list[str] | None = Query(None, description="class names to keep (repeat or comma-separate)"),
        response_format: Literal["json", "image", "jpeg", "png"] = Query(
            "json", alias="format", description="image or jpeg: the annotated image as JPEG; png: as PNG"
        ),
    ) -> Response:
        """An image as multipart field `file` (or `image`), or as the raw body with an image content type.
        With `format=image` or `jpeg` (or `Accept: image/jpeg`) the answer is the image with the boxes
        drawn, as JPEG; with `format=png` (or `Accept: image/png`) as PNG."""
        start = time.perf_counter()
        state = get_state(request)
        _, batcher = state.require_ready()  # before the upload is read: not ready answers 503 at once
        class_mask = parse_classes(classes, state)
        annotated = annotated_format(response_format, request.headers.get("accept", ""))
        uploads = await read_uploads(request, SINGLE_FIELDS, max_files=2)
        if len(uploads) != 1:
            raise ServiceError(
                422, "too_many_files", "send one image to /detect; use /detect/batch for several"
            )
        [(image, decode_ms)] = await read_images(
            uploads, state.settings, state.decoding, host_pixels=annotated is not None
        )
        [(result, queue_ms)] = await run_detection(state, request, batcher, [image])
        body = build_response(
            state, image, result, decode_ms, queue_ms, start, score_threshold, class_mask, max_detections
        )
        headers = {"Server-Timing": server_timing(body["timings_ms"])}
        if annotated and isinstance(image, DecodedImage):
            drawn = await asyncio.to_thread(annotate, image.pixels, body["detections"], annotated)
            return Response(
                drawn,
                media_type=f"image/{annotated}",
                headers={**headers, "X-Detections": str(len(body["detections"]))},
            )
        return JSONResponse(body, headers=headers)

    @api.post(
        "/detect/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=upload_body(BATCH_FIELDS, many=True),
        summary="Detect objects in several images",
    )
    async def detect_batch(
        request: Request,
        score_threshold: float = Query(settings.default_score_threshold, ge=0.0, le=1.0),
        max_detections: int = Query(max_det, ge=1, le=max_det),
        classes: list[str] | None = Query(None, description="class names to keep (repeat or comma-separate)"),
    ) -> JSONResponse:
        """Several images as repeated multipart fields `files` (or `file`, `images`, `image`); one result per
        file, in upload order: its detections, or the error that file alone got (an unreadable or corrupt
        image does not fail the others). What fails the whole request (503 overloaded, 504, a bad query)
        is answered as by /detect."""
        start = time.perf_counter()
        state = get_state(request)
        _, batcher = state.require_ready()
        class_mask = parse_classes(classes, state)
        uploads = await read_uploads(request, BATCH_FIELDS, max_files=state.settings.max_images_per_request)
        read = await read_each(uploads, state)
        errors: dict[int, ServiceError | UnusableImage] = {
            i: r for i, r in enumerate(read) if isinstance(r, ServiceError)
        }
        readable = {i: r for i, r in enumerate(read) if not isinstance(r, ServiceError)}
        images = [image for image, _ in readable.values()]
        outcomes = await detection_outcomes(state, request, batcher, images) if images else []
        detected = {}
        for index, outcome in zip(readable, outcomes, strict=True):
            if isinstance(outcome, UnusableImage):
                errors[index] = outcome
            else:
                detected[index] = outcome
        items, bodies = [], []
        for index, upload in enumerate(uploads):
            if index in errors:
                items.append(failed_item(upload.filename, errors[index]))
                continue
            (image, decode_ms), (result, queue_ms) = readable[index], detected[index]
            body = build_response(
                state, image, result, decode_ms, queue_ms, start, score_threshold, class_mask, max_detections
            )
            bodies.append(body)
            items.append({"filename": upload.filename, "status": 200, **body})
        headers = {"Server-Timing": server_timing(bodies[0]["timings_ms"])} if bodies else {}
        return JSONResponse({"results": items, "failed": len(errors)}, headers=headers)

    return api


def parse_classes(classes: list[str] | None, state: ServiceState) -> np.ndarray | None:
    """Class names (repeated and/or comma-separated, case-insensitive) -> a mask over network labels
    (bool [C], ``mask[label]``); 422 if unknown."""
    if not classes:
        return None
    names = state.detector.config.class_names if state.detector else ()
    lookup = {n.casefold(): i + 1 for i, n in enumerate(names)}
    wanted = [c.strip() for value in classes for c in value.split(",") if c.strip()]
    unknown = [c for c in wanted if c.casefold() not in lookup]
    if unknown:
        raise ServiceError(
            422, "unknown_class", f"unknown class(es) {unknown}; this model detects {list(names)}"
        )
    if not wanted:
        return None
    mask = np.zeros(len(names) + 1, dtype=bool)
    mask[[lookup[c.casefold()] for c in wanted]] = True
    return mask


async def run_detection(
    state: ServiceState,
    request: Request,
    batcher: DynamicBatcher,
    images: list[UploadedImage],
    filenames: list[str | None] | None = None,
) -> list[tuple[ImageDetections, float]]:
    """``detection_outcomes``, where an image the engine could not decode fails the request
    (``UnusableImage``, naming the file when there are several: ``service.http_errors`` answers it)."""
    answers = []
    for index, outcome in enumerate(await detection_outcomes(state, request, batcher, images)):
        if isinstance(outcome, UnusableImage):
            raise name_file(outcome, index, filenames[index]) if len(images) > 1 and filenames else outcome
        answers.append(outcome)
    return answers


async def detection_outcomes(
    state: ServiceState, request: Request, batcher: DynamicBatcher, images: list[UploadedImage]
) -> list[tuple[ImageDetections, float] | UnusableImage]:
    """Queue every image (decoded pixels, or a JPEG for the engine), wait (bounded by the request
    timeout); returns (detections, queue ms) each, or the ``UnusableImage`` of an image the engine could
    not decode. What concerns the whole request (the batcher's refusals and drops, the timeout) is raised
    as it is: ``service.http_errors`` answers it."""
    timeout = state.settings.request_timeout_s
    deadline = request_deadline(request.scope.setdefault("state", {}), timeout)
    futures: list[asyncio.Future] = []
    try:
        for image in images:
            item = image.pixels if isinstance(image, DecodedImage) else image
            futures.append(batcher.submit(item, request.is_disconnected, deadline))
        _, waiting = await asyncio.wait(futures, timeout=max(deadline - time.monotonic(), 0.0))
        running = any(batcher.started(f) for f in waiting)
    finally:  # also when the drain's end cancels this request: nothing is left to run for it
        for future in futures:
            future.cancel()
    if waiting and running:
        raise ServiceError(504, "timeout", f"no answer within {timeout:g} s; the service is overloaded")
    if waiting:  # never reached the engine: nothing was done, retrying elsewhere is safe
        raise TooLate("the request could not be served before its deadline")
    answers: list[tuple[ImageDetections, float] | UnusableImage] = []
    for future in futures:
        try:
            result, queue_s = future.result()
        except UnusableImage as exc:
            answers.append(exc)
            continue
        answers.append((result, queue_s * 1e3))
    return answers


async def read_each(
    uploads: list[Upload], state: ServiceState
) -> list[tuple[UploadedImage, float] | ServiceError]:
    """``read_images`` file by file: a file that cannot be served gets its own 4xx in its place; a 5xx (the
    pixel budget is spent) fails the request."""

    async def read(upload: Upload) -> tuple[UploadedImage, float] | ServiceError:
        try:
            [image] = await read_images([upload], state.settings, state.decoding)
        except (ServiceError, UnusableImage) as exc:
            error = http_error(exc)
            if error is None or error.status >= 500:
                raise
            return error
        return image

    return list(await asyncio.gather(*map(read, uploads)))


def failed_item(filename: str | None, error: ServiceError | UnusableImage) -> dict[str, Any]:
    """The entry of a file that got an error in a /detect/batch answer (``schemas.BatchItem``), as
    ``service.http_errors`` would answer it alone."""
    answer = http_error(error)
    assert answer is not None
    return {
        "filename": filename,
        "status": answer.status,
        "error": {"code": answer.code, "message": answer.message},
    }


def build_response(
    state: ServiceState,
    image: UploadedImage,
    result: ImageDetections,
    decode_ms: float,
    queue_ms: float,
    start: float,
    score_threshold: float,
    class_mask: np.ndarray | None,
    max_detections: int,
) -> dict[str, Any]:
    names = state.detector.config.class_names if state.detector else ()
    detections = detection_dicts(
        result, image.width, image.height, names, score_threshold, class_mask, max_detections
    )
    timings = record_stages(state, result, decode_ms, queue_ms, start, len(detections))
    return {
        "detections": detections,
        "image": {"width": image.width, "height": image.height},
        "model": state.summary(),
        "timings_ms": {k: round(v, 3) for k, v in timings.items()},
    }


def detection_dicts(
    result: ImageDetections,
    width: int,
    height: int,
    names: tuple[str, ...],
    score_threshold: float,
    class_mask: np.ndarray | None,
    max_detections: int,
) -> list[dict[str, Any]]:
    """The response's detections: score strictly above the threshold, of the wanted classes, the best
    ``max_detections``; boxes in the image's pixels (``to_pixels``) rounded to 0.01, scores to 1e-5.
    Vectorised (numpy), since it runs on the event loop for every image."""
    scores = result.scores.numpy()
    labels = result.labels.numpy()
    keep = scores > score_threshold
    if class_mask is not None:
        keep &= class_mask[labels]
    rows = np.flatnonzero(keep)[:max_detections]
    boxes = to_pixels(result.boxes_xyxy[torch.from_numpy(rows)], width, height).numpy()
    boxes = np.round(boxes.astype(np.float64), 2).tolist()
    kept_scores = np.round(scores[rows].astype(np.float64), 5).tolist()
    return [
        {
            "label": names[label - 1],
            "class_id": label - 1,
            "score": score,
            "box": {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]},
        }
        for b, score, label in zip(boxes, kept_scores, labels[rows].tolist(), strict=True)
    ]


def server_timing(timings_ms: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={ms:.3f}" for stage, ms in timings_ms.items())


def annotated_format(response_format: str, accept: str) -> Literal["jpeg", "png"] | None:
    """The annotated image's format (None: JSON): ``format=image|jpeg|png``, else ``Accept: image/jpeg`` or
    ``image/png`` (without also accepting JSON)."""
    if response_format in ("image", "jpeg"):
        return "jpeg"
    if response_format == "png":
        return "png"
    accept = accept.lower()
    if "application/json" in accept:
        return None
    if "image/jpeg" in accept:
        return "jpeg"
    return "png" if "image/png" in accept else None


def record_stages(
    state: ServiceState, result: Any, decode_ms: float, queue_ms: float, start: float, found: int
) -> dict[str, float]:
    """One request's stage times in ms (decode, preprocess, queue, inference, postprocess, total), observed
    in the metrics with its number of detections; returned for the response."""
    times = result.times
    timings = {
        "decode": decode_ms,
        "preprocess": times.preprocess_ms,
        "queue": queue_ms,
        "inference": times.inference_ms,
        "postprocess": times.postprocess_ms,
        "total": (time.perf_counter() - start) * 1e3,
    }
    state.metrics.observe_stages(timings)
    state.metrics.detections.inc(found)
    return timings
