"""Prometheus metrics, in a registry owned by one app (so several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.batcher import BatchObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "total")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(BatchObserver):
    def __init__(self) -> None:
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
        self.in_flight = Gauge("refinedet_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("refinedet_queue_depth", "Images waiting for a batch", registry=r)
        self.ready = Gauge("refinedet_ready", "1 when the model is loaded and warmed up", registry=r)
        self.without_progress = Gauge(
            "refinedet_engine_seconds_without_progress",
            "Seconds the engine has had work without finishing any, or its oldest call has run (0 when idle); "
            "/readyz says stalled beyond ENGINE_STALL_S",
            registry=r,
        )
        self.model_info = Gauge(
            "refinedet_model_info",
            "The served model (value 1)",
            ["name", "backend", "device", "precision"],
            registry=r,
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

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def track_progress(self, stalled_s: Callable[[], float]) -> None:
        self.without_progress.set_function(stalled_s)

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
        return generate_latest(self.registry)
