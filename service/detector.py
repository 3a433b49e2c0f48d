"""One batch through the whole in-process path: preprocess -> backend -> shared post-processing.

``BatchDetector(backend)(images)`` is what the benchmark times; ``detector.detect(inputs)`` is what the
batcher's worker thread runs. Images are uint8 RGB Tensor[3, H, W] (``model.preprocess`` contract) of
any sizes, or uploads still encoded (``EncodedImage``), which the engine decodes (``service.decoding``:
nvJPEG on CUDA, a batch in one call; PIL on a CPU). Everything is on that device before preprocessing, so on CUDA
the resize and normalisation run on the GPU; a batch of same-size images is resized in one call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from model.postprocess import Detections, PostProcessor
from model.preprocess import preprocess
from service.backends.base import Backend, BackendOutput
from service.decoding import JpegDecoder, decode_on_host
from service.imaging import EncodedImage, UnusableImage

ImageInput = Tensor | EncodedImage  # decoded uint8 RGB [3, H, W], or an upload for the engine to decode


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


class BatchDetector:
    """``cpu_streams``: on a CPU, how many calls may run at once (the batcher's engine slots). A call that
    runs alone gets all the engine's threads; one that starts while another runs gets one thread
    (``CpuShare``), so under load the cores run independent one-thread inferences.

    ``decode_at_least``: on a CPU, a JPEG at least twice this on both sides is decoded at a reduced DCT
    scale that keeps both sides at least this (``service.imaging.reduced_scale``); None (the default):
    whole. Off by default: at the network's input size it cost 0.2 BCCD mAP on 2x and 4x photos
    (``bench.decode_scale``, docs/benchmarks.md).

    When the network runs in an artifact's runtime (ONNX Runtime, OpenVINO: their own thread pools), the
    PyTorch parts of a call (resize, normalisation, post-processing) run on one thread (``host_threads``):
    small ops gain little from an OpenMP team, and a team whose other thread the OS has given to another
    request's network waits for it at every op (measured: post-processing 11 ms on one thread, 243 ms on
    two while another process used the cores; docs/benchmarks.md)."""

    def __init__(
        self, backend: Backend, cpu_streams: int = 1, decoder: str = "pil", decode_at_least: int | None = None
    ) -> None:
        self.backend = backend
        self.decoder = decoder  # who decodes queued uploads: "nvjpeg" or "pil" (UploadDecoding's engine)
        self.config = backend.loaded_config
        self.decode_at_least = decode_at_least
        self.postprocessor = PostProcessor(self.config)
        self._jpeg_decoder: JpegDecoder | None = None  # made on the first EncodedImage on CUDA
        cpu = backend.device.type == "cpu"
        self.host_threads = 1 if cpu and backend.name != "torch" else None  # None: the network is PyTorch's
        self.cpu_share = CpuShare(torch.get_num_threads()) if cpu and cpu_streams > 1 else None
        self._one_thread_infer = (
            backend.single_thread_infer() if self.cpu_share is not None else backend.infer
        )

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
            if isinstance(result, UnusableImage):  # only an EncodedImage can fail: not reached
                raise result
        return [r for r in results if isinstance(r, ImageDetections)]

    @torch.inference_mode()
    def detect(self, inputs: Sequence[ImageInput]) -> list[ImageDetections | UnusableImage]:
        """Detect on decoded images and/or encoded uploads (any number; split into chunks of ``max_batch``).
        An upload that cannot be decoded gets its ``UnusableImage`` in its place (the batcher fails that
        request alone with it); the others are served.
        Safe to call from several threads at once (the batcher's engine slots)."""
        with self._torch_threads(self.host_threads):
            if self.cpu_share is None:
                return self._run_chunks(inputs, self.backend.infer)
            with self.cpu_share.call() as threads, self._torch_threads(self.host_threads or threads):
                return self._run_chunks(inputs, self.backend.infer if threads > 1 else self._one_thread_infer)

    @staticmethod
    @contextlib.contextmanager
    def _torch_threads(threads: int | None) -> Iterator[None]:
        """PyTorch's intra-op threads for this calling thread (kept per thread) within the block, as they
        were after it (None: unchanged)."""
        before = torch.get_num_threads()
        if threads is None or threads == before:
            yield
            return
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _run_chunks(
        self, inputs: Sequence[ImageInput], infer: Callable[[Tensor], BackendOutput]
    ) -> list[ImageDetections | UnusableImage]:
        results: list[ImageDetections | UnusableImage] = []
        for start in range(0, len(inputs), self.max_batch):
            results.extend(self._run_batch(inputs[start : start + self.max_batch], infer))
        return results

    def _run_batch(
        self, inputs: Sequence[ImageInput], infer: Callable[[Tensor], BackendOutput]
    ) -> list[ImageDetections | UnusableImage]:
        clock = StageClock(self.backend.device)
        images, failed = self._on_device(inputs)
        if not images:
            return [failed[i] for i in range(len(inputs))]
        x = preprocess(stack_if_same_size(images), self.config.input_size, self.config.normalization)
        clock.mark()
        outputs = infer(x)
        clock.mark()
        detections = self.postprocess(outputs)  # the one wait for the device: the copy to the host
        clock.mark()
        times = StageTimes(len(images), *clock.intervals_ms())
        found = iter([ImageDetections(*image, times=times) for image in detections.per_image()])
        return [failed[i] if i in failed else next(found) for i in range(len(inputs))]

    def _on_device(self, inputs: Sequence[ImageInput]) -> tuple[list[Tensor], dict[int, UnusableImage]]:
        """(the decodable inputs as uint8 Tensor[3, H, W] on the backend's device, in input order;
        {input index: error} for the others). The encoded ones are decoded together, in one call."""
        device = self.backend.device
        encoded = [item for item in inputs if isinstance(item, EncodedImage)]
        decoded = iter(self.decode(encoded) if encoded else [])
        images: list[Tensor] = []
        failed: dict[int, UnusableImage] = {}
        for i, item in enumerate(inputs):
            pixels = next(decoded) if isinstance(item, EncodedImage) else item.to(device, non_blocking=True)
            if isinstance(pixels, UnusableImage):
                failed[i] = pixels
            else:
                images.append(pixels)
        return images, failed

    def decode(self, encoded: Sequence[EncodedImage]) -> list[Tensor | UnusableImage]:
        """The engine's decode of queued uploads: nvJPEG (plain JPEGs, batched, on the GPU) or PIL."""
        if self.decoder == "nvjpeg":
            return self.jpeg_decoder(encoded)
        return decode_on_host(encoded, self.decode_at_least)

    @property
    def jpeg_decoder(self) -> JpegDecoder:
        if self._jpeg_decoder is None:
            self._jpeg_decoder = JpegDecoder(self.backend.device)
        return self._jpeg_decoder


class CpuShare:
    """How concurrent calls share a CPU engine's threads: ``with share.call() as threads`` gives a call
    that starts while no other runs all ``threads`` (one intra-op team: the lowest latency for a lone
    request), and a call that starts while another runs one thread.

    Why: an intra-op team synchronises at every layer, so whenever the OS takes one of its threads away
    (another inference, the handlers, any other process) the others wait; independent one-thread
    inferences never wait for each other. With the batcher's slots each taking the next request the
    moment they are free, a loaded engine runs one one-thread inference per core with no core idle
    (docs/benchmarks.md, "Serving on a CPU")."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._active = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def call(self) -> Iterator[int]:
        with self._lock:
            threads = self.threads if self._active == 0 else 1
            self._active += 1
        try:
            yield threads
        finally:
            with self._lock:
                self._active -= 1


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
    equals the per-image resize exactly), else the list as it is. One image is a view with its own
    strides (a channels-last decode stays channels-last: ``model.preprocess.preprocess``'s fast path)."""
    if len(images) == 1:
        return images[0].unsqueeze(0)
    first = images[0].shape
    return torch.stack(images) if all(im.shape == first for im in images) else images
