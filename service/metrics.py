"""Prometheus metrics, in a registry owned by one app (so several apps in one process never collide).

Several worker processes (``service.workers``): prometheus_client's multiprocess mode. The supervisor
gives every worker a fresh, empty directory in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client reads it
when it is imported, so it is set before a worker starts), each worker's values live in files there, and
``render`` (whichever worker a scrape reaches) sums every worker's files: counters and histograms over
every worker that ever ran (a replaced worker's counts stay), the gauges over the live workers
(``multiprocess_mode="livesum"``: requests in flight, queue depth, workers ready; ``"livemax"``: the
model's info); the supervisor removes a dead worker's gauge files (``mark_process_dead``). Gauges cannot
compute their value when scraped there, so the queue depth is set when it changes (``on_queue``) and the
engine's seconds without progress every second (``track_progress``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.batcher import BatchObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "total")
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable


def multiprocess_dir() -> Path | None:
    """The directory of prometheus_client's multiprocess mode, if this process is in it."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


class Metrics(BatchObserver):
    def __init__(self, multiprocess: Path | None = None) -> None:
        """``multiprocess``: the directory every worker's values are in (``render`` sums them); None: this
        process's values alone."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "refinedet_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "refinedet_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "refinedet_stage_duration_seconds",
            "Per-image latency of each detection stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "refinedet_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("refinedet_images", "Images detected on", registry=r)
        self.detections = Counter("refinedet_detections", "Detections returned", registry=r)
        self.dropped = Counter(
            "refinedet_dropped_requests", "Requests dropped before inference", ["reason"], registry=r
        )
        self.in_flight = Gauge(
            "refinedet_http_requests_in_flight",
            "HTTP requests being handled",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "refinedet_queue_depth", "Images waiting for a batch", registry=r, multiprocess_mode="livesum"
        )
        self.ready = Gauge(
            "refinedet_ready",
            "Workers whose model is loaded and warmed up (1 when ready, with one worker)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.without_progress = Gauge(
            "refinedet_engine_seconds_without_progress",
            "Seconds the engine has had work without finishing any, or its oldest call has run (0 when idle); "
            "/readyz says stalled beyond ENGINE_STALL_S; with several workers, the most stalled one's",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "refinedet_model_info",
            "The served model (value 1)",
            ["name", "backend", "device", "precision"],
            registry=r,
            multiprocess_mode="livemax",
        )

        # Labelled children looked up once: ``labels()`` costs a lock and a dict lookup per call.
        self._stage_children = {stage: self.stage_latency.labels(stage) for stage in STAGES}
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.request_latency.labels(route))
            if len(self._request_children) < 10_000:  # routes are bounded; statuses and methods nearly
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def track_progress(self, stalled_s: Callable[[], float]) -> None:
        """The readiness watchdog's seconds without progress: computed when scraped, in one process; with
        several workers a gauge cannot compute its value in another process, so each worker writes its own
        every second (``livemax``: the most stalled live worker's)."""
        if self.multiprocess is None:
            self.without_progress.set_function(stalled_s)
            return

        async def refresh() -> None:
            while True:
                self.without_progress.set(stalled_s())
                await asyncio.sleep(1.0)

        self._progress_task = asyncio.get_running_loop().create_task(refresh(), name="refinedet-progress")

    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)

    def on_drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            child = self._stage_children.get(stage) or self.stage_latency.labels(stage)
            child.observe(ms / 1000.0)

    def render(self) -> bytes:
        if self.multiprocess is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=str(self.multiprocess))
        return generate_latest(every_worker)
