"""Who decodes an upload (``UploadDecoding``: decided here only), and the engine's decoders.

The handler always checks an upload's header first (``service.imaging.read_header``: format, size,
limits, the pixel budget); then either it decodes the pixels itself (PIL, in a worker thread) or it
queues the bytes (``EncodedImage``) and the engine decodes them, in the thread that runs the request:

- on CUDA, plain JPEGs go to nvJPEG, a whole batch in one torchvision ``decode_jpeg`` call, then EXIF
  orientation (``JpegDecoder``); other formats are decoded by the handler;
- on a CPU, every upload is decoded by PIL in the engine slot that runs it (``decode_on_host``), so the
  handlers only move bytes and the decoding shares the cores with inference the way the engine does
  (one image per slot), instead of in up to 40 handler threads at once (docs/benchmarks.md).

Only damage past the header is left for the engine to find. When nvJPEG's batched call fails, every
image is decoded alone; an image it still refuses (or returns at a size its header did not promise) is
decoded by PIL on the CPU, exactly as the handler would have, so an image PIL can read is served and a
truly corrupt one gets the same ``UnusableImage`` as the handler's decode would raise, for that image only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from service.imaging import EncodedImage, ImageHeader, UnusableImage, decode_pixels

log = logging.getLogger("refinedet.service")

# EXIF orientation -> the transform PIL's ImageOps.exif_transpose applies, on Tensor[C, H, W].
ORIENT: dict[int, Callable[[Tensor], Tensor]] = {
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270 (counter-clockwise), i.e. 90 clockwise
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90 (counter-clockwise)
}


@dataclass(frozen=True)
class UploadDecoding:
    """Which uploads the engine decodes rather than the handler: ``"nvjpeg"`` plain JPEGs (CUDA),
    ``"pil"`` every upload (a CPU engine), ``"handler"`` none. Decided with the engine plan
    (``Settings.serving_for``, ``deploy.prepare``); the service only reads it."""

    engine: Literal["nvjpeg", "pil", "handler"]

    def in_engine(self, header: ImageHeader, host_pixels: bool = False) -> bool:
        """Whether the upload with ``header`` is left for the engine to decode; never when the request
        needs its pixels on the host (``host_pixels``: the annotated image is drawn on them)."""
        if host_pixels or self.engine == "handler":
            return False
        return self.engine == "pil" or header.plain_jpeg

    def describe(self, device: object) -> str:
        return {"nvjpeg": f"the engine (nvJPEG on {device})", "pil": "the engine (PIL, in each engine slot)",
                "handler": "the handler (PIL)"}[self.engine]  # fmt: skip


def decode_on_host(
    images: Sequence[EncodedImage], at_least: int | None = None
) -> list[Tensor | UnusableImage]:
    """The CPU engine's decoder: PIL, one image after another, in the calling thread; a JPEG at the
    smallest DCT scale with both sides at least ``at_least`` (``service.imaging.reduced_scale``; None:
    whole). Detections are normalised, so they map to the header's size (``EncodedImage.width/height``)
    whatever scale the pixels were decoded at. An image that cannot be decoded gets its ``UnusableImage``
    in its place."""
    decoded: list[Tensor | UnusableImage] = []
    for image in images:
        try:
            decoded.append(decode_pixels(image.data, at_least))
        except UnusableImage as exc:
            decoded.append(exc)
    return decoded


def orient(pixels: Tensor, orientation: int) -> Tensor:
    """Tensor[C, H, W] as stored -> as displayed for EXIF ``orientation`` (1..8; others: unchanged)."""
    transform = ORIENT.get(orientation)
    return transform(pixels) if transform else pixels


class JpegDecoder:
    """``decoder(jpegs) -> [pixels | UnusableImage]``: uint8 RGB Tensor[3, H, W] on ``device`` per upload
    (plain JPEGs: ``UploadDecoding("nvjpeg")``).

    Uses torchvision's ``decode_jpeg(list_of_uint8_tensors, mode=, device=)`` (the list form since
    torchvision 0.19, the project's floor); 0.29 deprecates it in favour of TorchCodec and warns on every
    call, which is silenced here.
    """

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        warnings.filterwarnings(
            "ignore",
            message=r"The image decoding and encoding capabilities of TorchVision",
            category=DeprecationWarning,
        )
        self.device = device
        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB

    def warmup(self, width: int = 640, height: int = 480) -> None:
        """Decode a batch of two once, without the PIL fallback: raises if the decoder itself cannot (e.g.
        torchvision without nvJPEG), and its lazy set-up (nvJPEG handles, buffers) happens at start-up
        rather than in the first request."""
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.linear_gradient("L").resize((width, height)).convert("RGB").save(out, format="JPEG")
        encoded = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
        decoded = self._decode([encoded, encoded])
        if [tuple(d.shape) for d in decoded] != [(3, height, width)] * 2:
            raise RuntimeError(f"the JPEG decoder on {self.device} returned {[d.shape for d in decoded]}")

    def __call__(self, jpegs: Sequence[EncodedImage]) -> list[Tensor | UnusableImage]:
        encoded = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
        try:
            decoded: list[Tensor | None] = list(self._decode(encoded))
        except RuntimeError as exc:  # one bad image fails the whole call: find it
            log.debug("batched JPEG decode of %d failed (%s); decoding one by one", len(jpegs), exc)
            decoded = [self._decode_one(e) for e in encoded]
        return [self._checked(j, pixels) for j, pixels in zip(jpegs, decoded, strict=True)]

    def _decode(self, encoded: list[Tensor]) -> list[Tensor]:
        if self.device.type == "cuda":
            # nvJPEG writes its outputs from its own stream without waiting for ours: with work still
            # queued here, memory that work reads could be handed out and overwritten (pytorch/vision#9606).
            torch.cuda.current_stream(self.device).synchronize()
        return self._decode_jpeg(encoded, mode=self._rgb, device=self.device)

    def _decode_one(self, encoded: Tensor) -> Tensor | None:
        try:
            return self._decode([encoded])[0]
        except RuntimeError:
            return None

    def _checked(self, jpeg: EncodedImage, pixels: Tensor | None) -> Tensor | UnusableImage:
        if pixels is not None:
            pixels = orient(pixels, jpeg.orientation)
            if pixels.shape == (3, jpeg.height, jpeg.width):
                return pixels
        log.debug("JPEG decoder refused a %dx%d upload; decoding it with PIL", jpeg.width, jpeg.height)
        try:
            return decode_pixels(jpeg.data).to(self.device)
        except UnusableImage as exc:
            return exc
