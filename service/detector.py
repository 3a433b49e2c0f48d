"""One batch through the whole in-process path: preprocess -> backend -> shared post-processing.

``Detector(backend)(images)`` is what the benchmark times; ``detector.detect(inputs)`` is what the
batcher's worker thread runs. Images are uint8 RGB Tensor[3, H, W] (``model.preprocess`` contract) of
any sizes, or JPEG uploads still encoded (``EncodedJpeg``), which are decoded together on the
backend's device (``service.decoding``). Everything is on that device before preprocessing, so on CUDA
the resize and normalisation run on the GPU; a batch of same-size images is resized in one call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import torch
from torch import Tensor

from model.postprocess import Detections, PostProcessor
from model.preprocess import preprocess
from service.backends.base import Backend, BackendOutput
from service.decoding import JpegDecoder
from service.errors import ServiceError
from service.imaging import EncodedJpeg

T = TypeVar("T")
R = TypeVar("R")
ImageInput = Tensor | EncodedJpeg  # decoded uint8 RGB [3, H, W], or a JPEG for the engine to decode


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
    """``cpu_streams``: on a CPU, a batch of several images runs as that many concurrent single-thread
    inferences (``CpuStreams``) instead of one call whose threads wait for each other at every layer;
    a lone image still gets all the engine's threads."""

    def __init__(self, backend: Backend, cpu_streams: int = 1) -> None:
        self.backend = backend
        self.config = backend.loaded_config
        self.postprocessor = PostProcessor(self.config)
        self._jpeg_decoder: JpegDecoder | None = None  # made on the first EncodedJpeg
        cpu = backend.device.type == "cpu"
        self.streams = CpuStreams(cpu_streams) if cpu and cpu_streams > 1 else None
        self._stream_infer = backend.single_thread_infer() if self.streams is not None else backend.infer

    @property
    def max_batch(self) -> int:
        return self.backend.max_batch

    def postprocess(self, outputs: BackendOutput) -> Detections:
        """The shared post-processing of a backend's outputs, whatever stage it stopped at, copied to the
        host (on CUDA sync-free until that copy; exact greedy NMS in every case)."""
        return self.postprocessor.to_host(outputs, self.backend.anchors)

    def __call__(self, images: Sequence[Tensor]) -> list[ImageDetections]:
        """Detect on decoded images (any number; split into chunks of ``max_batch``)."""
        results = self.detect(images)
        for result in results:
            if isinstance(result, ServiceError):  # only an EncodedJpeg can fail: not reached
                raise result
        return [r for r in results if isinstance(r, ImageDetections)]

    @torch.inference_mode()
    def detect(self, inputs: Sequence[ImageInput]) -> list[ImageDetections | ServiceError]:
        """Detect on decoded images and/or encoded JPEGs (any number; split into chunks of ``max_batch``).
        An upload that cannot be decoded gets its ``ServiceError`` in its place; the others are served."""
        results: list[ImageDetections | ServiceError] = []
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start : start + self.max_batch]
            if self.streams is not None and len(chunk) > 1:
                results.extend(self.streams.run(self._run_stream, chunk))
            else:
                if self.streams is not None:
                    self.streams.claim_engine_threads()
                results.extend(self._run_batch(chunk))
        return results

    def _run_stream(self, inputs: Sequence[ImageInput]) -> list[ImageDetections | ServiceError]:
        return self._run_batch(inputs, self._stream_infer)

    def _run_batch(
        self, inputs: Sequence[ImageInput], infer: Callable[[Tensor], BackendOutput] | None = None
    ) -> list[ImageDetections | ServiceError]:
        clock = StageClock(self.backend.device)
        images, failed = self._on_device(inputs)
        if not images:
            return [failed[i] for i in range(len(inputs))]
        x = preprocess(stack_if_same_size(images), self.config.input_size, self.config.normalization)
        clock.mark()
        outputs = (infer or self.backend.infer)(x)
        clock.mark()
        detections = self.postprocess(outputs)  # the one wait for the device: the copy to the host
        clock.mark()
        times = StageTimes(len(images), *clock.intervals_ms())
        found = iter([ImageDetections(*image, times=times) for image in detections.per_image()])
        return [failed[i] if i in failed else next(found) for i in range(len(inputs))]

    def _on_device(self, inputs: Sequence[ImageInput]) -> tuple[list[Tensor], dict[int, ServiceError]]:
        """(the decodable inputs as uint8 Tensor[3, H, W] on the backend's device, in input order;
        {input index: error} for the others). The JPEGs are decoded together, in one call."""
        device = self.backend.device
        jpegs = [item for item in inputs if isinstance(item, EncodedJpeg)]
        decoded = iter(self.jpeg_decoder(jpegs) if jpegs else [])
        images: list[Tensor] = []
        failed: dict[int, ServiceError] = {}
        for i, item in enumerate(inputs):
            pixels = next(decoded) if isinstance(item, EncodedJpeg) else item.to(device, non_blocking=True)
            if isinstance(pixels, ServiceError):
                failed[i] = pixels
            else:
                images.append(pixels)
        return images, failed

    @property
    def jpeg_decoder(self) -> JpegDecoder:
        if self._jpeg_decoder is None:
            self._jpeg_decoder = JpegDecoder(self.backend.device)
        return self._jpeg_decoder


class CpuStreams:
    """Concurrent single-thread inferences on a CPU: ``run(step, items)`` runs ``step([item])`` for every
    item on ``count`` threads (PyTorch limited to one intra-op thread there; ONNX Runtime sessions take
    concurrent runs), each thread taking the next item when it is free, and returns the results in order.

    Why: an intra-op thread team synchronises at every layer, so whenever the OS takes one of its
    threads away (the service's own handler threads, or any other process on the machine) the others
    wait; independent single-thread inferences never wait for each other. Measured on the shared 2-core
    machine: docs/benchmarks.md, "Serving on a CPU"."""

    def __init__(self, count: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.count = count
        self.engine_threads = torch.get_num_threads()  # what the engine thread runs a lone image with
        self._pool = ThreadPoolExecutor(count, "refinedet-cpu-stream", initializer=torch.set_num_threads,
                                        initargs=(1,))  # fmt: skip

    def run(self, step: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """``step`` on every item, one item at a time per stream, each stream taking the next item as
        soon as it is free (a stream slowed down by the OS never holds the others up); in order."""
        results: list[list[R] | None] = [None] * len(items)
        claim = iter(range(len(items)))
        lock = threading.Lock()

        def stream() -> None:
            with torch.inference_mode():  # thread-local: the stream threads need their own
                while True:
                    with lock:
                        index = next(claim, None)
                    if index is None:
                        return
                    results[index] = step(items[index : index + 1])

        futures = [self._pool.submit(stream) for _ in range(min(self.count, len(items)))]
        for future in futures:
            future.result()
        return [result for group in results if group is not None for result in group]

    def claim_engine_threads(self) -> None:
        """PyTorch's thread count is kept per thread but set through a process-wide call: make sure the
        calling (engine) thread runs with all of its threads."""
        if torch.get_num_threads() != self.engine_threads:
            torch.set_num_threads(self.engine_threads)


class StageClock:
    """Stage boundaries without host synchronisation: CUDA events on a GPU (read once the batch's
    detections are on the host, so never a wait of their own), ``perf_counter`` on the CPU. The first
    mark is taken at construction."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[torch.cuda.Event] = []
        self._times: list[float] = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._times.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            self._marks[-1].synchronize()  # already complete after the copy to the host
            return [a.elapsed_time(b) for a, b in pairwise(self._marks)]
        return [(b - a) * 1e3 for a, b in pairwise(self._times)]


def stack_if_same_size(images: list[Tensor]) -> Tensor | list[Tensor]:
    """One Tensor[B, 3, H, W] when every image has the same size (so the resize is one call; the result
    equals the per-image resize exactly), else the list as it is."""
    first = images[0].shape
    return torch.stack(images) if all(im.shape == first for im in images) else images
