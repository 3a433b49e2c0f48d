"""In-process latency benchmark: iterations of decode -> preprocess -> inference -> post-processing at a
chosen batch size, on the same ``BatchDetector`` the service uses.

``run_benchmark`` is the measurement, bounded in time (``budget_s``) and stopped between iterations by an
event. ``run_exclusive`` runs such work on the engine with the engine to itself (``DynamicBatcher.exclusive``:
requests queue meanwhile) and ends it when its caller goes away: the work is told to stop, and the engine
is released once its current iteration has finished, never while it still runs.
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.batcher import DynamicBatcher
from service.detector import BatchDetector, StageTimes
from service.imaging import decode_image

STAGES = ("decode", "preprocess", "inference", "postprocess", "total")
BAND_ROWS = 256  # synthetic_jpeg builds its pixels this many rows at a time (a multiple of its 64-px tile)
POLL_S = 0.1  # how often run_exclusive asks whether its caller is still there
R = TypeVar("R")


def synthetic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG of smooth gradients plus a tiled noise texture (decodes like a photo, unlike pure noise;
    cheap to make at any size: built in bands of rows, about 3 bytes of memory per pixel)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 200, height, dtype=np.float32)[:, None, None]
    tile = rng.integers(0, 40, (64, 64, 3), dtype=np.uint8)
    noise = np.tile(tile, (BAND_ROWS // 64, width // 64 + 1, 1))[:, :width]
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, BAND_ROWS):
        yb = y[top : top + BAND_ROWS]
        band = np.concatenate([x + 0 * yb, yb + 0 * x, (x + yb) / 2], axis=-1)
        pixels[top : top + BAND_ROWS] = band.astype(np.uint8) + noise[: len(yb)]
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def percentiles(values_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(arr.mean()), 3),
    }


@dataclass(frozen=True)
class BenchmarkResult:
    """``iterations`` timed (fewer than asked when ``stopped``: "time_limit" or "stopped"), their latency
    per stage ({stage: {p50, p90, p99, mean}}; empty if none ran), throughput, the decoded image's size and
    the seconds the run took, warm-up included."""

    iterations: int
    latency_ms: dict[str, dict[str, float]]
    throughput_images_per_s: float
    width: int
    height: int
    seconds: float
    stopped: str | None


@dataclass(frozen=True)
class _Iteration:
    decode_ms: float
    total_ms: float
    times: StageTimes
    width: int
    height: int


def _iterate(
    detector: BatchDetector, data: bytes, batch_size: int, max_pixels: int, min_side: int
) -> _Iteration:
    """One batch; its decoded images are freed on return (never two batches' at once)."""
    t0 = time.perf_counter()
    images = [decode_image(data, max_pixels, min_side) for _ in range(batch_size)]
    t1 = time.perf_counter()
    results = detector([im.pixels for im in images])
    t2 = time.perf_counter()
    return _Iteration((t1 - t0) * 1e3, (t2 - t0) * 1e3, results[0].times, images[0].width, images[0].height)


def run_benchmark(
    detector: BatchDetector,
    data: bytes,
    iterations: int,
    batch_size: int,
    warmup: int,
    max_pixels: int,
    min_side: int,
    *,
    budget_s: float = math.inf,
    stop: threading.Event | None = None,
    on_iteration: Callable[[], None] | None = None,
) -> BenchmarkResult:
    """Time ``iterations`` batches (after ``warmup`` untimed ones) of ``batch_size`` copies of the image.

    An iteration starts only while ``budget_s`` (seconds from the start, warm-up included) is not spent,
    except the first timed one (a warm-up that spends the budget ends early): the run takes at most
    ``budget_s`` plus the iteration under way, and one more when warm-up spent it. ``stop`` (set from
    another thread) ends it before the next iteration; ``on_iteration`` is called after each one.
    """
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    width = height = 0
    start = time.perf_counter()
    done = 0  # iterations run, warm-up included
    stopped = None
    while len(samples["total"]) < iterations:
        if stop is not None and stop.is_set():
            stopped = "stopped"
            break
        warming = done < warmup
        if time.perf_counter() - start >= budget_s:
            if samples["total"]:
                stopped = "time_limit"
                break
            if warming:
                done = warmup  # straight to the one timed iteration
                continue
        it = _iterate(detector, data, batch_size, max_pixels, min_side)
        done += 1
        if on_iteration is not None:
            on_iteration()
        width, height = it.width, it.height
        if warming:
            continue
        samples["decode"].append(it.decode_ms)
        samples["preprocess"].append(it.times.preprocess_ms)
        samples["inference"].append(it.times.inference_ms)
        samples["postprocess"].append(it.times.postprocess_ms)
        samples["total"].append(it.total_ms)
    timed = len(samples["total"])
    total_s = sum(samples["total"]) / 1e3
    return BenchmarkResult(
        iterations=timed,
        latency_ms={stage: percentiles(v) for stage, v in samples.items()} if timed else {},
        throughput_images_per_s=round(timed * batch_size / total_s, 3) if total_s > 0 else 0.0,
        width=width,
        height=height,
        seconds=round(time.perf_counter() - start, 3),
        stopped=stopped,
    )


StopCheck = Callable[[], Awaitable[BaseException | None]]


async def run_exclusive(batcher: DynamicBatcher, work: Callable[[threading.Event], R], check: StopCheck) -> R:
    """``work(stop)`` on an engine thread with the engine to itself (every slot of ``batcher``, taken once
    the calls in flight finish). ``check`` is asked every ``POLL_S`` while it waits for the engine or runs;
    when it returns an exception (the client left, the server drains), the wait is abandoned or ``stop``
    is set, and that exception is raised once ``work`` has returned (``work`` checks ``stop`` between
    iterations). Cancelled, it does the same and re-raises the cancellation; cancelled a second time while
    ``work`` finishes its iteration, it gives the engine back without waiting (a stuck engine is not
    waited on for ever)."""
    stop = threading.Event()

    async def hold() -> R:
        async with batcher.exclusive() as engine:
            ran = asyncio.get_running_loop().run_in_executor(engine, work, stop)
            try:
                return await asyncio.shield(ran)
            except asyncio.CancelledError:
                stop.set()
                await asyncio.wait({ran})  # the engine is given back only once the work has stopped
                raise

    task = asyncio.create_task(hold())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            reason = await check()
            if reason is not None:
                await _cancel(task)
                raise reason
    except asyncio.CancelledError:
        await _cancel(task)
        raise


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()  # cancelled again: stop waiting for the work to return (the engine is given back)
        raise
