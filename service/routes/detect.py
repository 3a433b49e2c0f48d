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
from service.imaging import DecodedImage, UnusableImage, annotate
from service.routes.deps import api_key_dependencies, get_state
from service.routes.uploads import (
    BATCH_FIELDS,
    SINGLE_FIELDS,
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
            200: {"content": {"image/jpeg": {}}, "description": "detections, or the annotated image"},
        },
        openapi_extra=upload_body(SINGLE_FIELDS, many=False),
        summary="Detect objects in one image",
    )
    async def detect(
        request: Request,
        score_threshold: float = Query(settings.default_score_threshold, ge=0.0, le=1.0),
        max_detections: int = Query(max_det, ge=1, le=max_det),
        classes: list[str] | None = Query(None, description="class names to keep (repeat or comma-separate)"),
        response_format: Literal["json", "image"] = Query(
            "json", alias="format", description="image: annotated JPEG"
        ),
    ) -> Response:
        """An image as multipart field `file` (or `image`), or as the raw body with an image content type.
        With `format=image` (or `Accept: image/jpeg`) the answer is the image with the boxes drawn."""
        start = time.perf_counter()
        state = get_state(request)
        _, batcher = state.require_ready()  # before the upload is read: not ready answers 503 at once
        class_mask = parse_classes(classes, state)
        annotated = response_format == "image" or wants_jpeg(request.headers.get("accept", ""))
        uploads = await read_uploads(request, SINGLE_FIELDS, max_files=2)
        if len(uploads) != 1:
            raise ServiceError(
                422, "too_many_files", "send one image to /detect; use /detect/batch for several"
            )
        [(image, decode_ms)] = await read_images(
            uploads, state.settings, state.decoding, host_pixels=annotated
        )
        [(result, queue_ms)] = await run_detection(state, request, batcher, [image])
        body = build_response(
            state, image, result, decode_ms, queue_ms, start, score_threshold, class_mask, max_detections
        )
        headers = {"Server-Timing": server_timing(body["timings_ms"])}
        if annotated and isinstance(image, DecodedImage):
            jpeg = await asyncio.to_thread(annotate, image.pixels, body["detections"])
            return Response(
                jpeg,
                media_type="image/jpeg",
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
        """Several images as repeated multipart fields `files` (or `file`, `images`, `image`); results come
        back in upload order. Any undecodable file fails the whole request with a 4xx naming it."""
        start = time.perf_counter()
        state = get_state(request)
        _, batcher = state.require_ready()
        class_mask = parse_classes(classes, state)
        uploads = await read_uploads(request, BATCH_FIELDS, max_files=state.settings.max_images_per_request)
        decoded = await read_images(uploads, state.settings, state.decoding)
        results = await run_detection(
            state, request, batcher, [image for image, _ in decoded], [u.filename for u in uploads]
        )
        bodies = [
            build_response(
                state, image, result, decode_ms, queue_ms, start, score_threshold, class_mask, max_detections
            )
            for (image, decode_ms), (result, queue_ms) in zip(decoded, results, strict=True)
        ]
        return JSONResponse(
            {"results": bodies}, headers={"Server-Timing": server_timing(bodies[0]["timings_ms"])}
        )

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
    """Queue every image (decoded pixels, or a JPEG for the engine), wait (bounded by the request
    timeout); returns (detections, queue ms) each. What the batcher refuses or drops it with, and an image
    the engine could not decode (``UnusableImage``, naming the file when there are several), are raised
    as they are: ``service.http_errors`` answers them."""
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
    answers = []
    for index, future in enumerate(futures):
        try:
            result, queue_s = future.result()
        except UnusableImage as exc:
            raise name_file(exc, index, filenames[index]) if len(images) > 1 and filenames else exc from None
        answers.append((result, queue_s * 1e3))
    return answers


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


def wants_jpeg(accept: str) -> bool:
    """``Accept: image/jpeg`` (without also accepting JSON) asks for the annotated image."""
    accept = accept.lower()
    return "image/jpeg" in accept and "application/json" not in accept


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
