"""What one running app holds: settings, metrics, and (once loaded) backend, detector and batcher.

Loading runs in a worker thread started by the app's lifespan, so /healthz answers at once and /readyz
says 503 until the model is loaded and warmed up. Shutdown marks the app not ready, then lets the
batcher finish everything already queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.backends.base import Backend
from service.batcher import DynamicBatcher
from service.detector import Detector
from service.errors import ServiceError
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("refinedet.service")
Loader = Callable[[Settings], Backend]


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.backend: Backend | None = None
        self.detector: Detector | None = None
        self.batcher: DynamicBatcher | None = None
        self.engine_jpeg = False  # JPEG uploads are decoded in the engine (settings.gpu_decode)
        self._summary: dict[str, str] | None = None
        self.status = "loading"  # loading -> ready -> shutting_down, or failed
        self.error: str | None = None
        self._load_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def start_loading(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="refinedet-load")

    async def _load(self) -> None:
        try:
            backend = await asyncio.to_thread(self.loader, self.settings)
        except Exception as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error, exc_info=not isinstance(exc, ValueError))
            return
        if self.status != "loading":  # shut down while loading
            return
        detector = Detector(backend, self.settings.cpu_streams_for(backend.device.type))
        engine_jpeg = self.settings.engine_decodes_jpeg(backend.device.type)
        if engine_jpeg:
            try:
                await asyncio.to_thread(detector.jpeg_decoder.warmup)
            except Exception as exc:  # e.g. torchvision built without nvJPEG
                problem = f"the JPEG decoder on {backend.device} failed: {type(exc).__name__}: {exc}"
                if self.settings.gpu_decode == "on":
                    self.status, self.error = "failed", problem
                    log.error("%s (REFINEDET_GPU_DECODE=on)", problem)
                    return
                log.warning("%s; decoding uploads with PIL instead", problem)
                engine_jpeg = False
            if self.status != "loading":
                return
        batcher: DynamicBatcher = DynamicBatcher(
            detector.detect,
            max_batch_size=min(self.settings.batch_limit(backend.device.type), backend.max_batch),
            max_delay_s=self.settings.max_delay_s,
            max_queue_size=self.settings.max_queue_size,
            observer=self.metrics,
        )
        batcher.start()
        self.backend, self.detector, self.batcher = backend, detector, batcher
        self.engine_jpeg = engine_jpeg
        self.metrics.track_queue(lambda: batcher.depth)
        self.metrics.model_info.labels(**self.summary()).set(1)
        self.metrics.ready.set(1)
        self.status = "ready"
        info = backend.info
        log.info(
            "ready: %s on %s (%s, %s), max batch %d, JPEG decode in %s; weights: %s",
            self.summary()["name"], backend.device, backend.name, backend.precision, batcher.max_batch_size,
            f"the engine ({backend.device})" if engine_jpeg else "the handler (PIL)", info.weights if info else "?",
        )  # fmt: skip

    async def shutdown(self) -> None:
        was = self.status
        self.status = "shutting_down"
        self.metrics.ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop(self.settings.graceful_timeout_s)
        log.info("shut down (was %s)", was)

    def require_ready(self) -> tuple[Detector, DynamicBatcher]:
        """The detector and batcher, or 503 while loading / after a failed load / during shutdown."""
        if self.ready and self.detector is not None and self.batcher is not None:
            return self.detector, self.batcher
        reason = {
            "loading": "the model is still loading",
            "failed": f"the model failed to load ({self.error})",
        }
        message = reason.get(self.status, "the service is shutting down")
        raise ServiceError(503, "not_ready", message, headers={"Retry-After": "5"})

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
