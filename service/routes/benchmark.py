"""POST /v1/benchmark: latency per stage and throughput of the in-process path, as JSON.

Disabled (403) unless ``enable_benchmark`` is set or an API key is configured (then it needs the key).
The image is the posted one (as for /detect) or, with an empty body, a synthetic JPEG.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from service.benchmark import run_benchmark, synthetic_jpeg
from service.errors import ServiceError
from service.routes.deps import api_key_dependencies, get_state
from service.routes.uploads import SINGLE_FIELDS, read_uploads, upload_body
from service.schemas import BenchmarkResponse, ErrorResponse
from service.settings import Settings

DISABLED = (
    "the benchmark endpoint is disabled: set REFINEDET_ENABLE_BENCHMARK=true (or configure REFINEDET_API_KEY "
    "to allow it for key holders)"
)


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["benchmark"], dependencies=api_key_dependencies(settings))
    errors: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorResponse} for c in (400, 401, 403, 413, 415, 422, 503)
    }

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
        Serving pauses while it runs."""
        state = get_state(request)
        if not state.settings.benchmark_allowed:
            raise ServiceError(403, "benchmark_disabled", DISABLED)
        detector, batcher = state.require_ready()
        if batch_size > detector.max_batch:
            raise ServiceError(
                422, "invalid_request", f"batch_size must be at most {detector.max_batch} for this model"
            )
        s = state.settings
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
        synthetic = not multipart and not await request.body()
        if synthetic:
            if width * height > s.max_image_pixels:
                raise ServiceError(
                    422, "invalid_request", f"width*height exceeds the {s.max_image_pixels}-pixel image limit"
                )
            data = await asyncio.to_thread(synthetic_jpeg, width, height)
        else:
            data = (await read_uploads(request, SINGLE_FIELDS, max_files=1))[0].data
        loop = asyncio.get_running_loop()
        args = (detector, data, iterations, batch_size, warmup, s.max_image_pixels, s.min_image_side)
        async with batcher.exclusive() as engine:  # the engine to itself: no request runs meanwhile
            stats = await loop.run_in_executor(engine, run_benchmark, *args)
        return {
            "iterations": iterations,
            "batch_size": batch_size,
            "image": {"width": stats["width"], "height": stats["height"]},
            "synthetic_image": synthetic,
            "latency_ms": stats["latency_ms"],
            "throughput_images_per_s": stats["throughput_images_per_s"],
            "model": state.summary(),
        }

    return api
