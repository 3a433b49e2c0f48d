"""Setting up a serving process, once per process (``service.server.run``, and each worker through
``service.app.create_app_from_env``): the allocator and where warnings go.

glibc: buffers from ``MMAP_THRESHOLD`` (32 MiB) up are allocated with ``mmap``, so their memory goes back
to the system when they are freed (glibc's adaptive threshold would keep it); Pillow allocates decoded
images in blocks of ``PIL_BLOCK_SIZE`` (64 MiB, above the threshold) instead of its default 16 MiB, so a
large decode is such a buffer. The threshold stays above a network activation at batch 1 (26 MB at
320 px), which therefore reuses heap memory: a 4 MiB threshold made every PyTorch activation a fresh
``mmap`` (4x the page faults, +40% latency per CPU inference, docs/benchmarks.md).

Once the model is loaded (``settle_after_load``, called by ``ServiceState``), every object that exists
then (modules, the model, the app: a few hundred thousand) is moved out of the cyclic garbage
collector's reach (``gc.freeze``). Otherwise, every so often, a full collection walks them all on the
event loop: measured 0.12-0.31 s in the middle of a burst of 400 requests, every connection waiting.
"""

from __future__ import annotations

import ctypes
import gc
import logging

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest; the adaptive threshold would grow to it anyway
PIL_BLOCK_SIZE = 64 * 1024 * 1024  # Pillow's default 16 MiB blocks stay on the heap and fragment it
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_serving = False  # prepare_process() ran: this is a serving process


def prepare_process() -> None:
    """Per serving process: the glibc mmap threshold, Pillow's block size, and warnings as log records (JSON lines), not bare stderr text."""
    global _serving
    _serving = True
    cap_mmap_threshold()
    set_pil_block_size()
    logging.captureWarnings(True)


def settle_after_load() -> bool:
    """In a serving process (``prepare_process`` ran), once its model is loaded: collect, then freeze
    everything left (``gc.freeze``), so later collections walk only what was allocated since. True if
    done; elsewhere (tests building many apps in one process) the collector is left as it is."""
    if not _serving:
        return False
    gc.collect()
    gc.freeze()
    return True


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
