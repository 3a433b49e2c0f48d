"""How uvicorn runs the service: ``run(settings)`` and the options it uses, in one place. ``deploy.cli``
(``refinedet serve``) decides what to serve, then calls ``run``.

- HTTP protocol: ``service.protocol.LimitedHttpToolsProtocol`` (httptools with a connection cap, a
  header-size limit (431) and a header timeout); its limits come from the app's lifespan state.
- ``timeout_keep_alive``: ``keep_alive_timeout_s``.
- Graceful shutdown: on SIGTERM/SIGINT uvicorn stops accepting, the app drains (``service.admission``):
  every request in flight is answered within ``graceful_timeout_s``, a result or 503 ``shutting_down``.
  uvicorn's own graceful timeout is ``DRAIN_MARGIN_S`` longer, so it never has to cancel a request itself
  (which would answer a bare 500).
- One worker: the app object. Several: the ``create_app_from_env`` factory, each worker reading the
  settings from ``REFINEDET_*`` variables exported here.
- glibc: buffers from ``MMAP_THRESHOLD`` (32 MiB) up are allocated with ``mmap``, so their memory goes back
  to the system when they are freed (glibc's adaptive threshold would keep it); Pillow allocates decoded
  images in blocks of ``PIL_BLOCK_SIZE`` (64 MiB, above the threshold) instead of its default 16 MiB, so a
  large decode is such a buffer. The threshold stays above a network activation at batch 1 (26 MB at
  320 px), which therefore reuses heap memory: a 4 MiB threshold made every PyTorch activation a fresh
  ``mmap`` (4x the page faults, +40% latency per CPU inference, docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from typing import Any

from service.settings import Settings

log = logging.getLogger("refinedet.service")
PROTOCOL = "service.protocol:LimitedHttpToolsProtocol"
DRAIN_MARGIN_S = 3.0
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest; the adaptive threshold would grow to it anyway
PIL_BLOCK_SIZE = 64 * 1024 * 1024  # Pillow's default 16 MiB blocks stay on the heap and fragment it
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def uvicorn_options(settings: Settings, json_logs: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` (without the app and workers)."""
    from service.logs import log_config

    return {
        "host": settings.host,
        "port": settings.port,
        "http": PROTOCOL,
        "log_config": log_config(settings.log_level, json_logs=json_logs),
        "access_log": False,  # the service writes its own, with request ids
        "proxy_headers": True,
        "timeout_keep_alive": max(1, math.ceil(settings.keep_alive_timeout_s)),
        "timeout_graceful_shutdown": math.ceil(settings.graceful_timeout_s + DRAIN_MARGIN_S),
    }


def run(settings: Settings, json_logs: bool = True) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see the module docstring)."""
    import uvicorn

    prepare_process()
    options = uvicorn_options(settings, json_logs)
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **options)
    else:
        os.environ.update(settings.to_env())
        uvicorn.run("service.app:create_app_from_env", factory=True, workers=settings.workers, **options)


def prepare_process() -> None:
    """Per serving process (``run``, and each worker through ``create_app_from_env``): the glibc mmap
    threshold, and warnings as log records (JSON lines), not bare stderr text."""
    cap_mmap_threshold()
    set_pil_block_size()
    logging.captureWarnings(True)


def set_pil_block_size(size: int = PIL_BLOCK_SIZE) -> None:
    """Pillow's image memory blocks (a decoded image is one or more of them)."""
    from PIL import Image

    Image.core.set_block_size(size)


def cap_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (True if set; False where there is no glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
