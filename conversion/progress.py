"""What a long conversion is doing, on stderr: a line per stage and a bar over the calibration images.

``export onnx --int8`` runs for a minute or more on a CPU (FP32 export, graph preparation, calibration on
every image, range selection, quantization); ``StageProgress`` is what the converters report to (they
take ``progress=None`` where no one watches).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class StageProgress:
    """``stage(text)`` prints ``<command>: <text>`` with the seconds elapsed so far; ``images(n)`` advances a
    bar over ``total_images`` (created on the first call). Disabled, it prints nothing."""

    def __init__(self, command: str, total_images: int = 0, enabled: bool = True) -> None:
        self.command, self.total_images, self.enabled = command, total_images, enabled
        self.start = time.perf_counter()
        self.done = 0
        self._bar: Any = None

    def stage(self, text: str) -> None:
        self._close_bar()
        if self.enabled:
            print(
                f"{self.command}: {text} ({time.perf_counter() - self.start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def images(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_images or None, desc="calibrate", unit="img", file=sys.stderr)
        self._bar.update(count)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close_bar()
