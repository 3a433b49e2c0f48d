"""Process-level controls of a training run: seeding, deterministic kernels, stop signals.

``StopSignals`` turns the first SIGINT/SIGTERM into a stop request that the trainer honours after the
current step (writing a checkpoint); a second SIGINT raises ``KeyboardInterrupt`` at once.
``deterministic_kernels`` makes a run bit-for-bit repeatable (and so a resumed run bit-identical to an
uninterrupted one): without it the data, augmentation, optimizer and schedule still continue exactly,
but some cuDNN / oneDNN kernels reduce in a thread-dependent order.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, prefer deterministic kernels (cuDNN, oneDNN, cuBLAS); restored afterwards."""
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.mkldnn.deterministic,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.mkldnn.deterministic = True  # type: ignore[assignment]  # a ContextProp
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.backends.mkldnn.deterministic = saved[4]


class StopSignals:
    """``with StopSignals() as stop:`` ... ``if stop.requested:`` (handlers only in the main thread)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request()

    def __enter__(self) -> StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
