"""Timing one callable: warm-up, then synchronous iterations timed with CUDA events (perf_counter on
the CPU) until ``iters`` are done or ``budget_s`` has passed (never fewer than ``MIN_ITERS``).

Each iteration ends with a device synchronisation, so the GPU is idle when the next one starts and an
iteration's time is its latency as a caller sees it (launches included). Throughput is images over
the summed iteration times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from service.backends.base import synchronize
from service.benchmark import percentiles

MIN_ITERS = 5


def time_iterations(
    fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, budget_s: float
) -> list[float]:
    """Milliseconds of each timed call of ``fn`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = device.type == "cuda"
    start = torch.cuda.Event(enable_timing=True) if cuda else None
    end = torch.cuda.Event(enable_timing=True) if cuda else None
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < iters and (len(samples) < MIN_ITERS or time.perf_counter() < deadline):
        if start is not None and end is not None:
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def summarize(samples_ms: list[float], batch: int) -> dict[str, Any]:
    """{median_ms, p99_ms, mean_ms, images_per_s, iterations} of per-batch latencies."""
    stats = percentiles(samples_ms)
    total_s = sum(samples_ms) / 1e3
    rate = batch * len(samples_ms) / total_s if total_s > 0 else None
    return {
        "median_ms": stats["p50"],
        "p99_ms": stats["p99"],
        "mean_ms": stats["mean"],
        "images_per_s": None if rate is None else round(rate, 1 if rate >= 100 else 3),
        "iterations": len(samples_ms),
    }
