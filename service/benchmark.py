"""In-process latency benchmark: N iterations of decode -> preprocess -> inference -> post-processing
at a chosen batch size, on the same ``BatchDetector`` the service uses. Runs on the engine thread, so it
never overlaps with serving (requests queue meanwhile)."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from service.detector import BatchDetector
from service.imaging import decode_image

STAGES = ("decode", "preprocess", "inference", "postprocess", "total")


def synthetic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG of smooth gradients plus a tiled noise texture (decodes like a photo, unlike pure noise;
    cheap to make at any size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 200, height, dtype=np.float32)[:, None, None]
    base = np.broadcast_to(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1), (height, width, 3))
    tile = rng.integers(0, 40, (64, 64, 3), dtype=np.uint8)
    noise = np.tile(tile, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    pixels = (base.astype(np.uint8) + noise).astype(np.uint8)
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


def run_benchmark(
    detector: BatchDetector,
    data: bytes,
    iterations: int,
    batch_size: int,
    warmup: int,
    max_pixels: int,
    min_side: int,
) -> dict[str, Any]:
    """Time ``iterations`` batches (after ``warmup`` untimed ones) of ``batch_size`` copies of the image.

    Returns {"latency_ms": {stage: {p50, p90, p99, mean}}, "throughput_images_per_s", "width", "height"}.
    """
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    width = height = 0
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        images = [decode_image(data, max_pixels, min_side) for _ in range(batch_size)]
        t1 = time.perf_counter()
        results = detector([im.pixels for im in images])
        t2 = time.perf_counter()
        width, height = images[0].width, images[0].height
        if i < warmup:
            continue
        times = results[0].times
        samples["decode"].append((t1 - t0) * 1e3)
        samples["preprocess"].append(times.preprocess_ms)
        samples["inference"].append(times.inference_ms)
        samples["postprocess"].append(times.postprocess_ms)
        samples["total"].append((t2 - t0) * 1e3)
    total_s = sum(samples["total"]) / 1e3
    return {
        "latency_ms": {stage: percentiles(v) for stage, v in samples.items()},
        "throughput_images_per_s": round(iterations * batch_size / total_s, 3) if total_s > 0 else 0.0,
        "width": width,
        "height": height,
    }
