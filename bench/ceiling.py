"""The network-only ceiling of what the service serves: its own backend (``service.backends``, built from
the same settings: the same file, runtime and engine threads), fed a preprocessed image already in
memory. No HTTP, no decoding, no pre- or post-processing: what no app serving this file on this CPU can
beat.

- ``batch1_ms``: one call at a time with all the engine's threads (what a lone request gets): the median.
- ``images_per_s``: ``streams`` threads calling at once for ``duration_s``, each on the one-thread call
  the service's engine slots use under load (``Backend.single_thread_infer``, ``service.detector.CpuShare``).

    python -m bench.ceiling --model cache/int8.onnx --streams 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.timing import MIN_ITERS


class NetworkCeiling:
    """The service's backend for ``model`` (``backend``: the service's --backend), loaded once on the CPU
    as the service loads it; ``measure()`` as often as wanted (e.g. between the levels of a sweep, so that
    the ceiling sees the same machine load as the apps). ``image``: uint8 RGB [3, H, W] to feed (default:
    a mid-grey 640x480)."""

    def __init__(
        self, model: Path | None, backend: str = "auto", streams: int = 2, image: Tensor | None = None
    ) -> None:
        from bench.common import service_backend
        from model.preprocess import preprocess
        from service.process import cap_mmap_threshold
        from service.settings import Settings

        cap_mmap_threshold()  # as a serving process does (service.process): fresh mmaps would slow every call
        settings = Settings(model=model, backend=backend, device="cpu")
        self.engine, plan = service_backend(settings)
        self.threads = plan.threads
        self.engine.load()
        self.engine.warmup(2)
        self.streams = streams
        self._stream_infers = [self.engine.single_thread_infer() for _ in range(streams)]
        config = self.engine.loaded_config
        pixels = image if image is not None else torch.full((3, 480, 640), 128, dtype=torch.uint8)
        self.x = preprocess([pixels], config.input_size, config.normalization)

    def measure(self, duration_s: float = 5.0, iters: int = 30) -> dict[str, Any]:
        """{engine, threads, batch1_ms, batch1_p90_ms, batch1_runs, streams, images_per_s}."""
        with torch.inference_mode():
            lone = _latencies(self.engine.infer, self.x, iters, duration_s)
            rate = _throughput(self._stream_infers, self.x, duration_s)
        return {
            "engine": f"{self.engine.name}-{self.engine.precision}",
            "threads": self.threads,
            "batch1_ms": round(statistics.median(lone), 2),
            "batch1_p90_ms": round(statistics.quantiles(lone, n=10)[-1], 2) if len(lone) > 1 else lone[0],
            "batch1_runs": len(lone),
            "streams": self.streams,
            "images_per_s": round(rate, 2),
        }


def network_ceiling(
    model: Path | None, backend: str = "auto", streams: int = 2, duration_s: float = 5.0, iters: int = 30,
    image: Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One ``NetworkCeiling(...).measure(...)``."""
    return NetworkCeiling(model, backend, streams, image).measure(duration_s, iters)


def _latencies(infer: Callable[[Tensor], Any], x: Tensor, iters: int, budget_s: float) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < iters and (len(samples) < MIN_ITERS or time.perf_counter() < deadline):
        start = time.perf_counter()
        infer(x)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _throughput(infers: list[Callable[[Tensor], Any]], x: Tensor, duration_s: float) -> float:
    """Images per second of ``len(infers)`` threads, each calling its own ``infer`` in a loop (one warm-up
    call each first, then ``duration_s`` counted)."""
    counts = [0] * len(infers)
    barrier = threading.Barrier(len(infers) + 1)
    window: list[float] = []

    def stream(k: int) -> None:
        torch.set_num_threads(1)  # per thread, as the service's engine slots set it
        with torch.inference_mode():
            infers[k](x)
            barrier.wait()
            while time.perf_counter() < window[0]:
                infers[k](x)
                counts[k] += 1

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(len(infers))]
    for t in threads:
        t.start()
    window.append(time.perf_counter() + 1e9)  # set before the barrier releases anyone
    barrier.wait()
    start = time.perf_counter()
    window[0] = start + duration_s
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="what the service serves (default: the shipped checkpoint)")
    p.add_argument("--backend", default="auto", help="the service's --backend (default auto)")
    p.add_argument("--streams", type=int, default=2, help="concurrent one-thread streams (default 2)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of the streams' run (default 5)")
    args = p.parse_args(argv)
    print(json.dumps(network_ceiling(args.model, args.backend, args.streams, args.duration), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
