"""The small interface every inference backend implements, and what the service reports about it.

A backend owns the network (or engine) and nothing else: preprocessing happens before it
(``model.preprocess``) and the shared post-processing after it (``model.postprocess``)::

    backend.load(); backend.warmup()
    outputs = backend.infer(images)  # images: Tensor[B, 3, S, S] normalised, on backend.device
    detections = BatchDetector(backend).postprocess(outputs)  # on the host, whatever the output kind

``infer`` accepts any 1 <= B <= ``max_batch`` and pads internally where the engine needs fixed or
bucketed batch sizes; it returns ``RefineDetOutput`` (raw heads), ``DecodedOutput`` (boxes, scores) or,
where the backend ran the post-processing itself, ``SelectedOutput``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.config import RefineDetConfig
from model.postprocess import DecodedOutput, SelectedOutput
from model.runtime.base import RunnerOutput, pad_batch

BackendOutput = RunnerOutput | SelectedOutput


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/model reports: where the weights came from and whether they are trained."""

    name: str
    artifact: Path | None  # None: built in memory (untrained default)
    artifact_sha256: str | None
    trained: bool
    weights: str  # human description, e.g. "checkpoint /models/x.pth" or "untrained (random init)"


class Backend(abc.ABC):
    """Base class; subclasses set ``config``, ``anchors`` ([A, 4] cxcywh on ``device``) and ``info`` in
    ``load()``. Engine calls happen on one worker thread at a time (the batcher's)."""

    name: str = "base"

    def __init__(self, device: torch.device, max_batch: int) -> None:
        self.device = device
        self.requested_max_batch = max_batch
        self.config: RefineDetConfig | None = None
        self.anchors: Tensor | None = None
        self.info: ModelInfo | None = None

    @property
    @abc.abstractmethod
    def precision(self) -> str:
        """ "fp32", "fp16" or "int8"."""

    @property
    def max_batch(self) -> int:
        """The largest batch ``infer`` takes (the setting, capped by what the artifact allows)."""
        return self.requested_max_batch

    @abc.abstractmethod
    def load(self) -> None:
        """Read the artifact and put the model on ``device``; sets config, anchors and info."""

    @abc.abstractmethod
    def infer(self, images: Tensor) -> BackendOutput:
        """images: Tensor[B, 3, S, S] float normalised on ``device`` -> raw heads, decoded outputs or
        selected detections."""

    def warmup_batch_sizes(self) -> list[int]:
        """Batch sizes to warm up at start-up: 1 and the largest on a GPU (allocator, kernel selection),
        1 on the CPU (nothing is shape-specialised there)."""
        return sorted({1, self.max_batch}) if self.device.type == "cuda" else [1]

    def warmup(self, iterations: int = 1) -> None:
        """Run ``iterations`` dummy batches of each warm-up size so that lazy initialisation happens
        before the first request (0: none); synchronises the device."""
        cfg = self.loaded_config
        for b in self.warmup_batch_sizes():
            x = torch.zeros(b, 3, cfg.input_size, cfg.input_size, device=self.device)
            for _ in range(iterations):
                self.infer(x)
        synchronize(self.device)

    def single_thread_infer(self) -> Callable[[Tensor], BackendOutput]:
        """``infer`` for a call that shares the CPU with others (``service.detector.CpuShare``): work on the
        calling thread only.
        The default is ``infer`` (PyTorch keeps its thread count per calling thread); a backend whose
        runtime owns a thread pool returns a call into a one-thread session instead."""
        return self.infer

    @property
    def loaded_config(self) -> RefineDetConfig:
        if self.config is None:
            raise RuntimeError(f"{self.name} backend used before load()")
        return self.config

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, plus ``max_batch`` itself: [1, 2, 4, 8] for 8, [1, 2, 4, 6] for 6."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def bucket_for(b: int, buckets: list[int]) -> int:
    """The smallest bucket >= b."""
    for size in buckets:
        if size >= b:
            return size
    raise ValueError(f"batch {b} exceeds the largest bucket {buckets[-1]}")


__all__ = [
    "Backend",
    "BackendOutput",
    "DecodedOutput",
    "ModelInfo",
    "RunnerOutput",
    "SelectedOutput",
    "batch_buckets",
    "bucket_for",
    "pad_batch",
]
