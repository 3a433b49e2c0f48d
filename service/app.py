"""``create_app(settings)``: the FastAPI application, wired from its parts.

Nothing is read at import time. ``create_app_from_env`` is the factory worker processes call (``refinedet
serve --workers N``, ``service.workers``; or another ASGI server's workers): each reads ``REFINEDET_*`` from
its environment and loads its own copy of the model, and its metrics are every worker's
(``PROMETHEUS_MULTIPROC_DIR``, ``service.metrics``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from model.runtime.plan import PLAN_ENV, EnginePlan
from model.version import package_version
from service.admission import GuardMiddleware
from service.docs_ui import DOCS_PATH, install_swagger_ui
from service.http_errors import install_error_handlers
from service.metrics import Metrics, multiprocess_dir
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware, RequestLog, early_refusals
from service.protocol import DRAIN_KEY, EARLY_KEY, LIMITS_KEY, HttpLimits
from service.routes import benchmark, detect, health, inference_v2
from service.routes.page import PAGE_PATH, install_page
from service.settings import Settings
from service.state import Loader, ServiceState

DESCRIPTION = """RefineDet object detection over HTTP.

POST an image (JPEG, PNG, WebP or BMP) to `/detect` as multipart field `file` or as the raw body with an
image content type; get detections in original-image pixels, or the annotated image with `?format=image`
(JPEG) or `?format=png`. Try it in a browser on [the page at /](/).
"""


def plan_loader(plan: EnginePlan) -> Loader:
    """``loader(settings) -> Backend``: the backend ``plan`` names, loaded and warmed up."""

    def load(settings: Settings):
        from service.backends import load_backend

        return load_backend(plan, settings)

    return load


class ModelNotLoaded(RuntimeError):
    """A ``serve_when_ready`` app's model failed to load: its server must not start."""


def create_app(
    settings: Settings | None = None,
    loader: Loader | None = None,
    plan: EnginePlan | None = None,
    on_failed: Callable[[str], None] | None = None,
    *,
    metrics_dir: Path | None = None,
    serve_when_ready: bool = False,
) -> FastAPI:
    """The service app serving ``plan`` (``deploy.prepare``'s decision: the app builds it, it decides
    nothing); tests pass a ``loader(settings) -> Backend`` of their own instead (or with a plan).
    ``on_failed(reason)`` is called if the model fails to load (``refinedet serve`` then stops).
    ``metrics_dir``: every worker's metrics are there (``service.metrics``). ``serve_when_ready``: the
    app's startup ends once the model is loaded and warmed up (the server takes no connection before;
    a replacement worker, ``service.workers``), and fails if it cannot load."""
    settings = settings or Settings()
    if loader is None:
        if plan is None:
            raise ValueError("create_app needs the engine plan (deploy.prepare.prepare) or a loader")
        loader = plan_loader(plan)
    metrics = Metrics(metrics_dir)
    state = ServiceState(settings, metrics, loader, plan, on_failed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        state.start_loading()
        if serve_when_ready and not await state.loaded():
            raise ModelNotLoaded("the model failed to load; the reason is logged above")
        requests.prepare()  # the OpenAPI schema, once, before any request (not on the first refusal)
        # Shared with uvicorn's protocols (service.protocol): their limits, the drain's start, and
        # admission at the HTTP layer (refusals answered from the request's headers).
        yield {
            LIMITS_KEY: http_limits(settings),
            DRAIN_KEY: state.begin_drain,
            EARLY_KEY: early_refusals(state.admission, requests),
        }
        await state.shutdown()

    app = FastAPI(
        title="RefineDet detection service",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs comes from install_swagger_ui: the package's assets, no CDN
        redoc_url=None,  # FastAPI's ReDoc page needs a CDN too: /docs is the one API page
    )
    install_swagger_ui(app)
    app.state.service = state
    install_error_handlers(app)
    app.include_router(detect.router(settings))
    app.include_router(health.router(settings))
    app.include_router(inference_v2.router(settings))
    app.include_router(benchmark.router(settings))
    install_page(app, settings)  # / for people, its assets under /ui
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Server-Timing"],
        )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, idle_timeout_s=settings.body_timeout_s
    )
    app.add_middleware(GuardMiddleware, admission=state.admission)
    pages = (app.openapi_url, DOCS_PATH, PAGE_PATH, app.swagger_ui_oauth2_redirect_url)
    docs = frozenset(p for p in pages if p)
    requests = RequestLog(
        metrics,
        settings.access_log,
        known_paths=docs,
        route_paths=lambda: app.openapi().get("paths", {}),
        mounts=[route.path for route in app.routes if isinstance(route, Mount)],
    )
    app.add_middleware(RequestContextMiddleware, requests=requests)
    return app


def http_limits(settings: Settings) -> HttpLimits:
    return HttpLimits(
        settings.max_connections,
        settings.max_header_bytes,
        settings.header_timeout_s,
        max_body_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
    )


def create_app_from_env(
    on_failed: Callable[[str], None] | None = None, *, serve_when_ready: bool = False
) -> FastAPI:
    """Factory for worker processes (and ``uvicorn --factory``): settings from the REFINEDET_* environment,
    metrics every worker's when ``PROMETHEUS_MULTIPROC_DIR`` is set; the rest as ``create_app``."""
    from service.process import prepare_process

    prepare_process()  # worker processes are spawned: set up each one as ``run`` does its own
    plan = os.environ.get(PLAN_ENV)
    if not plan:
        raise RuntimeError(f"{PLAN_ENV} is not set: start the service with `refinedet serve`")
    return create_app(
        Settings(),
        plan=EnginePlan.from_json(plan),
        on_failed=on_failed,
        metrics_dir=multiprocess_dir(),
        serve_when_ready=serve_when_ready,
    )
