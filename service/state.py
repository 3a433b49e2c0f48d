"""What one running app holds: settings, metrics, and (once loaded) backend, detector and batcher.

Loading runs in a worker thread started by the app's lifespan, so /healthz answers at once and /readyz
says 503 until the model is loaded and warmed up. When the server starts shutting down, ``begin_drain``
marks the app not ready and gives every request in flight ``graceful_timeout_s`` to be answered
(``service.admission``); once the connections are closed, ``shutdown`` stops the batcher.

It also holds what admission control counts: requests admitted and not finished, and the decoded-pixel
budget. A load failure's details go to the log only; responses say that it failed, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.admission import PixelBudget, overloaded, shutting_down
from service.backends.base import Backend
from service.batcher import DynamicBatcher
from service.decoding import UploadDecoding
from service.detector import Detector
from service.errors import ServiceError
from service.metrics import Metrics
from service.process import settle_after_load
from service.settings import Settings

if TYPE_CHECKING:
    from model.runtime.plan import EnginePlan

log = logging.getLogger("refinedet.service")
Loader = Callable[[Settings], Backend]


class ServiceState:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        loader: Loader,
        plan: EnginePlan | None = None,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_failed = on_failed  # called with the reason when the model fails to load
        self.plan = plan  # the engine decision (deploy.prepare); None: a loader's own engine (tests)
        self.metrics = metrics
        self.loader = loader
        self.backend: Backend | None = None
        self.detector: Detector | None = None
        self.batcher: DynamicBatcher | None = None
        self.decoding = UploadDecoding("handler")  # which uploads the engine decodes (set when loaded)
        self._summary: dict[str, str] | None = None
        self.status = "loading"  # loading -> ready -> draining -> shutting_down, or failed
        self.error: str | None = None  # for the log only
        self._load_task: asyncio.Task | None = None
        self.admitted = 0  # inference requests admitted and not finished
        self.pixels = PixelBudget(settings.max_pixels_in_flight)
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain ends
        self._watched: set[asyncio.Timeout] = set()

    @property
    def ready(self) -> bool:
        """Readiness: loaded and not draining."""
        return self.status == "ready"

    @property
    def serving(self) -> bool:
        """Requests are served (also while draining, until the drain ends)."""
        return self.status in ("ready", "draining")

    def start_loading(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="refinedet-load")

    async def _load(self) -> None:
        try:
            backend = await asyncio.to_thread(self.loader, self.settings)
        except Exception as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error, exc_info=not isinstance(exc, ValueError))
            self.metrics.ready.set(0)
            self._failed()
            return
        if self.status != "loading":  # shut down while loading
            return
        # The plan's batch, slots and decoding; a loader without a plan gets the same rule for its device.
        knobs = self.plan if self.plan is not None else self.settings.serving_for(backend.device.type)
        streams = knobs.slots
        decoding = UploadDecoding(knobs.decode)  # type: ignore[arg-type]
        detector = Detector(backend, streams, decoding.engine)
        if decoding.engine == "nvjpeg":
            try:
                await asyncio.to_thread(detector.jpeg_decoder.warmup)
            except Exception as exc:  # e.g. torchvision built without nvJPEG
                problem = f"the JPEG decoder on {backend.device} failed: {type(exc).__name__}: {exc}"
                if self.settings.engine_decode == "on":
                    self.status, self.error = "failed", problem
                    log.error("%s (REFINEDET_ENGINE_DECODE=on)", problem)
                    self._failed()
                    return
                log.warning("%s; decoding uploads with PIL in the handler instead", problem)
                decoding = UploadDecoding("handler")
                detector.decoder = "pil"
            if self.status != "loading":
                return
        batcher: DynamicBatcher = DynamicBatcher(
            detector.detect,
            max_batch_size=min(knobs.max_batch, backend.max_batch),
            max_delay_s=self.settings.max_delay_s,
            max_queue_size=self.settings.max_queue_size,
            observer=self.metrics,
            concurrency=streams,
        )
        batcher.start()
        self.backend, self.detector, self.batcher = backend, detector, batcher
        self.decoding = decoding
        self.metrics.track_queue(lambda: batcher.depth)
        self.metrics.model_info.labels(**self.summary()).set(1)
        self.metrics.ready.set(1)
        settle_after_load()  # (service.process: the startup objects out of the collector's reach)
        self.status = "ready"
        info = backend.info
        log.info(
            "ready: %s on %s (%s, %s), max batch %d, %d at once, uploads decoded in %s; weights: %s",
            self.summary()["name"], backend.device, backend.name, backend.precision, batcher.max_batch_size, streams,
            decoding.describe(backend.device), info.weights if info else "?",
        )  # fmt: skip

    def _failed(self) -> None:
        """A load that failed is permanent: tell whoever runs the server (``refinedet serve`` stops it)."""
        if self.on_failed is not None and self.error is not None:
            self.on_failed(self.error)

    def begin_drain(self) -> None:
        """The server stops taking connections: not ready from now on, and every request in flight (or
        arriving) is answered within ``graceful_timeout_s``. Idempotent."""
        if self.drain_deadline is not None:
            return
        grace = self.settings.graceful_timeout_s
        self.drain_deadline = time.monotonic() + grace
        if self.status in ("ready", "loading"):
            self.status = "draining"
        self.metrics.ready.set(0)
        log.info("draining: %d request(s) in flight get up to %.0f s", len(self._watched), grace)
        for timeout in self._watched:
            self._cap(timeout)

    def watch(self, timeout: asyncio.Timeout) -> None:
        """Track a request's timeout scope: the drain's end cancels it."""
        self._watched.add(timeout)
        if self.drain_deadline is not None:
            self._cap(timeout)

    def unwatch(self, timeout: asyncio.Timeout) -> None:
        self._watched.discard(timeout)

    def _cap(self, timeout: asyncio.Timeout) -> None:
        assert self.drain_deadline is not None
        when = asyncio.get_running_loop().time() + (self.drain_deadline - time.monotonic())
        current = timeout.when()
        if current is None or current > when:
            timeout.reschedule(when)

    def admit(self, deadline: float) -> ServiceError | None:
        """Admit one inference request due by ``deadline`` (monotonic), or the 503 to answer it with now:
        its expected wait (``DynamicBatcher.expected_wait_s``: ``ahead // (batch x slots) + 1`` recent batch
        times) must fit in
        ``admission_headroom`` of the time it has left (to the drain's end, while draining)."""
        now = time.monotonic()
        draining = self.drain_deadline is not None and self.drain_deadline < deadline
        if draining:
            deadline = self.drain_deadline  # type: ignore[assignment]
        batcher = self.batcher
        if batcher is None or not self.serving:
            if draining:
                return shutting_down()
            self.admitted += 1  # the route answers not_ready; counted like any admitted request
            return None
        ahead = self.admitted
        expected = batcher.expected_wait_s(ahead)
        allowed = self.settings.admission_headroom * (deadline - now)
        if ahead >= self.settings.max_queue_size or expected > allowed:
            self.metrics.on_drop("draining" if draining else "admission")
            return shutting_down() if draining else overloaded(expected, allowed)
        self.admitted += 1
        return None

    async def shutdown(self) -> None:
        """Lifespan shutdown, once uvicorn closed the connections: stop the batcher."""
        self.begin_drain()
        was = self.status
        self.status = "shutting_down"
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop(self.settings.graceful_timeout_s)
        log.info("shut down (was %s)", was)

    def require_ready(self) -> tuple[Detector, DynamicBatcher]:
        """The detector and batcher, or 503 while loading / after a failed load / during shutdown."""
        if self.serving and self.detector is not None and self.batcher is not None:
            return self.detector, self.batcher
        if self.status == "failed":  # for good: no Retry-After
            raise ServiceError(503, "not_ready", "the model failed to load; see the service log")
        if self.status == "loading":
            raise ServiceError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})
        raise shutting_down()

    def summary(self) -> dict[str, str]:
        """name, backend, device, precision of the served model."""
        backend = self.backend
        if backend is None:
            return {
                "name": self.settings.model_name or "unknown",
                "backend": "none",
                "device": "none",
                "precision": "none",
            }
        if self._summary is None:  # once per backend: every response carries it
            name = backend.info.name if backend.info else backend.loaded_config.name
            self._summary = {"name": name, **backend.describe()}
        return self._summary
