"""POST /v1/benchmark: latency per stage and throughput of the in-process path, as JSON.

Disabled (403) unless ``enable_benchmark`` is set or an API key is configured (then it needs the key).
The image is the posted one (as for /detect) or, with an empty body, a synthetic JPEG.

The benchmark has the engine to itself while it runs (requests queue), so it is bounded so that it can
never keep /detect waiting longer than one bounded run (service/README.md, "The benchmark's limits"):

- one at a time, and only while no inference request is being served: otherwise 429 ``benchmark_busy``
  with ``Retry-After`` at once, before anything is read or made;
- at most ``benchmark_max_s`` of iterations (or what is left of the request's deadline): then it stops and
  reports the iterations it ran (``"stopped": "time_limit"``);
- at most ``benchmark_max_pixels`` decoded per iteration (batch_size x width x height), reserved from the
  pixel budget while it runs: 422 for a synthetic image over it, 413 for a posted one;
- stopped between iterations when its client disconnects (499) or the server drains (503
  ``shutting_down``); the engine is given back once the iteration under way has finished.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

from fastapi import APIRouter, Query, Request

from service.admission import current_reserver, request_deadline
from service.batcher import ClientGone, ShuttingDown
from service.benchmark import BenchmarkResult, run_benchmark, run_exclusive, synthetic_jpeg
from service.errors import ServiceError
from service.imaging import read_header
from service.routes.deps import api_key_dependencies, get_state
from service.routes.uploads import SINGLE_FIELDS, read_uploads, upload_body
from service.schemas import BenchmarkResponse, ErrorResponse
from service.settings import Settings
from service.state import ServiceState

DISABLED = (
    "the benchmark endpoint is disabled: set REFINEDET_ENABLE_BENCHMARK=true (or configure REFINEDET_API_KEY "
    "to allow it for key holders)"
)
BUSY = "benchmark_busy"


class Turn:
    """The benchmark's turn on the engine: one at a time, and only while no inference request is served."""

    def __init__(self) -> None:
        self.until: float | None = None  # while one runs: when its time budget ends (time.monotonic())

    def take(self, admitted: int, budget_s: float) -> None:
        """Take the turn for a run of up to ``budget_s``, or raise 429 ``benchmark_busy`` (with
        ``admitted`` inference requests being served, or another benchmark running)."""
        now = time.monotonic()
        if self.until is not None:
            retry = str(max(1, math.ceil(self.until - now)))
            message = "another benchmark is running (one runs at a time); retry after it"
            raise ServiceError(429, BUSY, message, {"Retry-After": retry})
        if admitted:
            message = f"{admitted} inference request(s) being served go first; retry when the service is idle"
            raise ServiceError(429, BUSY, message, {"Retry-After": "1"})
        self.until = now + budget_s

    def give_back(self) -> None:
        self.until = None


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["benchmark"], dependencies=api_key_dependencies(settings))
    errors: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse} for c in (400, 401, 403, 413, 415, 422, 429, 503)
    }
    turn = Turn()

    @api.post(
        "/v1/benchmark",
        response_model=BenchmarkResponse,
        responses=errors,
        openapi_extra=upload_body(SINGLE_FIELDS, False, False),
    )
    async def benchmark(
        request: Request,
        iterations: int = Query(20, ge=1, le=settings.benchmark_max_iterations),
        batch_size: int = Query(1, ge=1, le=settings.max_batch_size or 256),
        warmup: int = Query(2, ge=0, le=settings.benchmark_max_iterations),
        width: int = Query(
            640, ge=max(settings.min_image_side, 16), le=4096, description="synthetic image width"
        ),
        height: int = Query(
            480, ge=max(settings.min_image_side, 16), le=4096, description="synthetic image height"
        ),
    ) -> dict[str, Any]:
        """Run `iterations` batches of `batch_size` copies of the image through decode, preprocess,
        inference and post-processing; returns p50/p90/p99/mean per stage and images per second.
        Serving pauses while it runs: one at a time, only while no detection is being served (else 429),
        for at most BENCHMARK_MAX_S (then `stopped` is `time_limit` and `iterations` says how many ran)."""
        state = get_state(request)
        if not state.settings.benchmark_allowed:
            raise ServiceError(403, "benchmark_disabled", DISABLED)
        detector, batcher = state.require_ready()
        if batch_size > detector.max_batch:
            raise ServiceError(
                422, "invalid_request", f"batch_size must be at most {detector.max_batch} for this model"
            )
        s = state.settings
        deadline = request_deadline(request.scope.setdefault("state", {}), s.request_timeout_s)
        budget_s = min(s.benchmark_max_s, deadline - time.monotonic())
        turn.take(state.admission.admitted, budget_s)
        try:
            data, synthetic, pixels = await benchmark_image(request, s, batch_size, width, height)
            reserve = current_reserver.get()
            if reserve is not None:
                reserve(batch_size * pixels)  # given back when the request ends

            def work(stop: threading.Event) -> BenchmarkResult:
                return run_benchmark(
                    detector, data, iterations, batch_size, warmup, s.max_image_pixels, s.min_image_side,
                    budget_s=budget_s, stop=stop, on_iteration=batcher.progress,
                )  # fmt: skip

            result = await run_exclusive(batcher, work, lambda: stop_reason(state, request))
        finally:
            turn.give_back()
        return {
            "iterations": result.iterations,
            "iterations_requested": iterations,
            "stopped": result.stopped,
            "seconds": result.seconds,
            "batch_size": batch_size,
            "image": {"width": result.width, "height": result.height},
            "synthetic_image": synthetic,
            "latency_ms": result.latency_ms,
            "throughput_images_per_s": result.throughput_images_per_s,
            "model": state.summary(),
        }

    return api


async def benchmark_image(
    request: Request, s: Settings, batch_size: int, width: int, height: int
) -> tuple[bytes, bool, int]:
    """(encoded image, synthetic or not, its pixels): the posted image, or a synthetic JPEG of
    ``width`` x ``height`` with an empty body; 422 (synthetic) or 413 (posted) if ``batch_size`` copies
    exceed the benchmark's pixel limit."""
    limit = min(s.benchmark_max_pixels, s.max_pixels_in_flight)
    over = f"exceeds the benchmark's limit of {limit} decoded pixels per iteration (BENCHMARK_MAX_PIXELS)"
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
    if not multipart and not await request.body():
        if width * height > s.max_image_pixels:
            raise ServiceError(
                422, "invalid_request", f"width*height exceeds the {s.max_image_pixels}-pixel image limit"
            )
        if batch_size * width * height > limit:
            raise ServiceError(422, "invalid_request", f"batch_size x width x height {over}")
        return await asyncio.to_thread(synthetic_jpeg, width, height), True, width * height
    data = (await read_uploads(request, SINGLE_FIELDS, max_files=1))[0].data
    header = read_header(data, s.max_image_pixels, s.min_image_side)
    pixels = header.width * header.height
    if batch_size * pixels > limit:
        raise ServiceError(413, "image_too_large", f"batch_size x the image's width x height {over}")
    return data, False, pixels


async def stop_reason(state: ServiceState, request: Request) -> BaseException | None:
    """Why a running benchmark must stop now: the server drains, or its client left; None to go on."""
    if state.admission.drain_deadline is not None:
        return ShuttingDown("the service is shutting down")
    if await request.is_disconnected():
        return ClientGone("the client disconnected during the benchmark")
    return None
