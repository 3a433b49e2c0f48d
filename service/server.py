"""Running the app under uvicorn: one place for every server option (bind address, workers, logging,
graceful shutdown). ``deploy.cli`` (``refinedet serve``) decides what to serve, then calls ``run``."""

from __future__ import annotations

import os
from typing import Any

from service.settings import Settings


def uvicorn_options(settings: Settings, json_logs: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` shared by the one-worker and the many-worker starts."""
    from service.logs import log_config

    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": log_config(settings.log_level, json_logs=json_logs),
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.graceful_timeout_s),
        "proxy_headers": True,
    }


def run(settings: Settings, json_logs: bool = True) -> None:
    """Serve until stopped. One worker: the app object built here. Several: each worker process builds
    its own app (and loads its own model) from the environment, so the settings are exported to it."""
    import uvicorn

    options = uvicorn_options(settings, json_logs)
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **options)
    else:
        os.environ.update(settings.to_env())
        uvicorn.run("service.app:create_app_from_env", factory=True, workers=settings.workers, **options)
