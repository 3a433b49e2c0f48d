"""One batch through the whole in-process path: preprocess -> backend -> shared post-processing.

``Detector(backend)(images)`` is what the batcher's worker thread runs and what the benchmark times.
Images are uint8 RGB Tensor[3, H, W] (``model.preprocess`` contract) of any sizes; they are moved to
the backend's device first, so on CUDA the resize and normalisation run on the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.postprocess import Detections, PostProcessor, select_detections
from model.preprocess import preprocess
from model.runtime.base import DecodedOutput, RunnerOutput
from service.backends.base import Backend, synchronize


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds spent on one batch, per stage (shared by every image of the batch)."""

    batch_size: int
    preprocess_ms: float
    inference_ms: float
    postprocess_ms: float


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections, best first: boxes_xyxy Tensor[N, 4] normalised to the image (not clipped),
    scores Tensor[N], labels Tensor[N] network class ids 1..C-1 (``class_names[label - 1]``). CPU."""

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    times: StageTimes


class Detector:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.config = backend.loaded_config
        self.postprocessor = PostProcessor(self.config)

    @property
    def max_batch(self) -> int:
        return self.backend.max_batch

    def postprocess(self, outputs: RunnerOutput) -> Detections:
        """The shared selection; decoding too unless the artifact decoded inside its graph."""
        if isinstance(outputs, DecodedOutput):
            return select_detections(outputs.boxes_xyxy, outputs.scores, self.postprocessor.postprocess)
        assert self.backend.anchors is not None
        return self.postprocessor(outputs, self.backend.anchors)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Tensor]) -> list[ImageDetections]:
        """Detect on up to ``max_batch`` images at once (larger inputs are split into chunks)."""
        results: list[ImageDetections] = []
        for start in range(0, len(images), self.max_batch):
            results.extend(self._run_batch(images[start : start + self.max_batch]))
        return results

    def _run_batch(self, images: Sequence[Tensor]) -> list[ImageDetections]:
        device = self.backend.device
        t0 = time.perf_counter()
        on_device = [im.to(device, non_blocking=True) for im in images]
        x = preprocess(on_device, self.config.input_size, self.config.normalization)
        synchronize(device)
        t1 = time.perf_counter()
        outputs = self.backend.infer(x)
        synchronize(device)
        t2 = time.perf_counter()
        detections = self.postprocess(outputs).to("cpu")
        t3 = time.perf_counter()
        times = StageTimes(len(images), (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return [ImageDetections(*detections.image(i), times=times) for i in range(len(images))]
