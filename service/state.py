"""What one running app holds: settings, metrics, and (once loaded) backend, detector and batcher.

Loading runs in a worker thread started by the app's lifespan, so /healthz answers at once and /readyz
says 503 until the model is loaded and warmed up. When the server starts shutting down, ``begin_drain``
marks the app not ready and starts the drain (``service.admission.Admission``: every request in flight
gets ``graceful_timeout_s`` to be answered); once the connections are closed, ``shutdown`` stops the
batcher. Its ``admission`` decides which requests are served; the state hands it the batcher while it
serves. A load failure's details go to the log only; responses say that it failed, nothing more. While
it serves, ``stalled_for`` is the batcher's watchdog held to ``engine_stall_s`` (readiness).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from service.admission import Admission
from service.backends.base import Backend
from service.batcher import DynamicBatcher
from service.decoding import UploadDecoding
from service.detector import BatchDetector
from service.errors import not_ready, shutting_down
from service.metrics import Metrics
from service.process import settle_after_load
from service.settings import Settings

if TYPE_CHECKING:
    from model.runtime.plan import EnginePlan

log = logging.getLogger("refinedet.service")
Loader = Callable[[Settings], Backend]


class ServiceStatus(StrEnum):
    """What the app is doing: ``LOADING`` -> ``READY`` -> ``DRAINING`` -> ``SHUTTING_DOWN``, or ``FAILED``
    (the value is what /readyz says)."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # the server stopped taking connections; requests in flight are still served
    SHUTTING_DOWN = "shutting_down"
    FAILED = "failed"


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
        self.detector: BatchDetector | None = None
        self.batcher: DynamicBatcher | None = None
        self.decoding = UploadDecoding("handler")  # which uploads the engine decodes (set when loaded)
        self._summary: dict[str, str] | None = None
        self.status = ServiceStatus.LOADING
        self.error: str | None = None  # for the log only
        self._load_task: asyncio.Task | None = None
        self._stall_logged = False
        self.admission = Admission(settings, metrics)

    @property
    def ready(self) -> bool:
        """Readiness: loaded and not draining."""
        return self.status == ServiceStatus.READY

    @property
    def serving(self) -> bool:
        """Requests are served (also while draining, until the drain ends)."""
        return self.status in (ServiceStatus.READY, ServiceStatus.DRAINING)

    def start_loading(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="refinedet-load")

    async def loaded(self) -> bool:
        """Once loading has ended: whether the model serves (False: it failed, or the app stopped)."""
        if self._load_task is not None:
            await asyncio.shield(self._load_task)
        return self.ready

    async def _load(self) -> None:
        try:
            backend = await asyncio.to_thread(self.loader, self.settings)
        except Exception as exc:
            self.status, self.error = ServiceStatus.FAILED, f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error, exc_info=not isinstance(exc, ValueError))
            self.metrics.ready.set(0)
            self._failed()
            return
        if self.status != ServiceStatus.LOADING:  # shut down while loading
            return
        # The plan's batch, slots and decoding; a loader without a plan gets the same rule for its device.
        knobs = self.plan if self.plan is not None else self.settings.serving_for(backend.device.type)
        streams = knobs.slots
        decoding = UploadDecoding(knobs.decode)  # type: ignore[arg-type]
        # A large JPEG is decoded at a reduced DCT scale that keeps both sides at least twice the input:
        # up to 16x less decoding for a 2560x1920 photo, BCCD mAP unchanged (+0.28; at 1x it cost 0.2).
        at_least = 2 * backend.loaded_config.input_size
        detector = BatchDetector(backend, streams, decoding.engine, decode_at_least=at_least)
        if decoding.engine == "nvjpeg":
            try:
                await asyncio.to_thread(detector.jpeg_decoder.warmup)
            except Exception as exc:  # e.g. torchvision built without nvJPEG
                problem = f"the JPEG decoder on {backend.device} failed: {type(exc).__name__}: {exc}"
                if self.settings.engine_decode == "on":
                    self.status, self.error = ServiceStatus.FAILED, problem
                    log.error("%s (REFINEDET_ENGINE_DECODE=on)", problem)
                    self._failed()
                    return
                log.warning("%s; decoding uploads with PIL in the handler instead", problem)
                decoding = UploadDecoding("handler")
                detector.decoder = "pil"
            if self.status != ServiceStatus.LOADING:
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
        self.metrics.track_progress(batcher.stalled_s)
        self.metrics.model_info.labels(**self.summary()).set(1)
        self.metrics.ready.set(1)
        settle_after_load()  # (service.process: the startup objects out of the collector's reach)
        self.admission.batcher = batcher
        self.status = ServiceStatus.READY
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
        """The server stops taking connections: not ready from now on, and the drain starts (every request
        in flight or arriving is answered within ``graceful_timeout_s``). Idempotent."""
        if not self.admission.begin_drain():
            return
        if self.status in (ServiceStatus.READY, ServiceStatus.LOADING):
            self.status = ServiceStatus.DRAINING
        self.metrics.ready.set(0)

    async def shutdown(self) -> None:
        """Lifespan shutdown, once uvicorn closed the connections: stop the batcher."""
        self.begin_drain()
        was = self.status
        self.status = ServiceStatus.SHUTTING_DOWN
        self.admission.batcher = None  # arriving requests: shutting_down, or admitted to hear not_ready
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop(self.settings.graceful_timeout_s)
        log.info("shut down (was %s)", was)

    def stalled_for(self) -> float | None:
        """While serving: the seconds the engine has gone without progress, if over ``engine_stall_s``
        (``DynamicBatcher.stalled_s``: it had work and finished none, or one call ran that long); else None.
        The first answer of a stall, and the recovery, are logged."""
        stalled = self.batcher.stalled_s() if self.batcher is not None and self.serving else 0.0
        over = stalled > self.settings.engine_stall_s
        if over != self._stall_logged:
            self._stall_logged = over
            if over:
                log.error("the engine has made no progress for %.1f s with work waiting: not ready", stalled)
            else:
                log.warning("the engine is making progress again: ready")
        return stalled if over else None

    def require_ready(self) -> tuple[BatchDetector, DynamicBatcher]:
        """The detector and batcher, or 503 while loading / after a failed load / during shutdown."""
        if self.serving and self.detector is not None and self.batcher is not None:
            return self.detector, self.batcher
        if self.status in (ServiceStatus.FAILED, ServiceStatus.LOADING):
            raise not_ready(failed=self.status == ServiceStatus.FAILED)
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
