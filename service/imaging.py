"""Uploads -> uint8 RGB tensors (``model.preprocess.pil_to_rgb``), with the limits that keep bad or
hostile input a clear failure of its own (``UnusableImage``, whose ``ImageProblem`` the HTTP layer answers
with a 4xx: ``service.http_errors``): empty, undecodable or truncated, another image format, more pixels
than allowed (checked from the header before anything is decoded, so a decompression bomb is never
expanded), smaller than the minimum side. Also draws detections onto an image for ``?format=image``.

Every check needs only the header (PIL opens lazily), so an upload the engine decodes is not decoded
here: ``read_header`` checks it, and the bytes are queued as an ``EncodedImage`` for the engine
(``service.decoding.UploadDecoding`` says which uploads those are). Anything else is decoded by PIL.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from model.drawing import draw_detections
from model.preprocess import pil_to_rgb

log = logging.getLogger("refinedet.service")
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
SUPPORTED_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
    }
)
SUPPORTED_TEXT = "JPEG, PNG, WebP or BMP"
# Signatures of common formats we do not decode, to answer 415 (not 400) for them.
OTHER_FORMATS = (
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x8aMNG", "MNG"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
EXIF_ORIENTATION = 0x0112
# PIL modes of plain JPEGs (what nvJPEG decodes to RGB as libjpeg does); CMYK and YCCK are not.
PLAIN_JPEG_MODES = ("RGB", "L")


class ImageProblem(StrEnum):
    """Why an upload cannot be served; the value is the stable code the API answers with."""

    EMPTY = "empty_image"
    INVALID = "invalid_image"  # not a decodable image of a supported format, truncated or corrupt
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image, of a format not served (GIF, TIFF, ...)
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a raw body declared as something else
    TOO_LARGE = "image_too_large"
    TOO_SMALL = "image_too_small"


class UnusableImage(Exception):
    """An upload that cannot be served: its ``problem`` and a message for people. Raised by the checks and
    decoders here and in ``service.decoding``, in the handler or in the engine (where it fails that image
    alone)."""

    def __init__(self, problem: ImageProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message

    def with_message(self, message: str) -> UnusableImage:
        return UnusableImage(self.problem, message)


@dataclass(frozen=True)
class DecodedImage:
    """pixels: uint8 RGB Tensor[3, H, W] after EXIF orientation; width/height are its W and H."""

    pixels: Tensor
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class EncodedImage:
    """An upload whose header passed every check, left for the engine to decode. width/height are after
    EXIF orientation (as ``DecodedImage``'s); orientation is the EXIF value (1: as stored)."""

    data: bytes
    width: int
    height: int
    orientation: int
    format: str


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: format, PIL mode, size after EXIF orientation, the orientation, and whether
    it is a ``plain_jpeg`` (complete, baseline or progressive, RGB or grayscale, without an Adobe colour
    transform marker: what a GPU JPEG decoder reads exactly as PIL does)."""

    format: str
    mode: str
    width: int
    height: int
    orientation: int
    plain_jpeg: bool

    def deferred(self, data: bytes) -> EncodedImage:
        return EncodedImage(data, self.width, self.height, self.orientation, self.format)


def sniff_other_format(data: bytes) -> str | None:
    """The name of a known image format we do not support, from its first bytes."""
    for magic, name in OTHER_FORMATS:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    head = data[:256].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "SVG"
    return None


def media_type(content_type: str | None) -> str:
    """``image/JPEG; q=1`` -> ``image/jpeg``; "" when absent."""
    return (content_type or "").split(";")[0].strip().lower()


def check_media_type(media: str) -> None:
    """A raw request body must declare a supported image type (``media`` as ``media_type`` gives it);
    ``UnusableImage`` otherwise."""
    if media not in SUPPORTED_MEDIA_TYPES and media != "application/octet-stream":
        raise UnusableImage(
            ImageProblem.UNSUPPORTED_MEDIA_TYPE,
            f"content type {media or '(none)'!r} is not supported: send a {SUPPORTED_TEXT} image as multipart "
            "field 'file' or as the raw body with an image/* content type",
        )


def open_image(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Open an upload lazily (header only) and check it; raises ``UnusableImage``. The caller closes the
    image."""
    if not data:
        raise UnusableImage(ImageProblem.EMPTY, f"the upload is empty: send a {SUPPORTED_TEXT} image")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        raise UnusableImage(ImageProblem.TOO_LARGE, f"image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        other = sniff_other_format(data)
        if other:
            raise UnusableImage(
                ImageProblem.UNSUPPORTED_FORMAT, f"{other} images are not supported: send {SUPPORTED_TEXT}"
            ) from None
        raise UnusableImage(
            ImageProblem.INVALID, f"the upload is not a decodable {SUPPORTED_TEXT} image"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UnusableImage(
            ImageProblem.TOO_LARGE, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
        )
    if min(width, height) < min_side:
        image.close()
        raise UnusableImage(
            ImageProblem.TOO_SMALL,
            f"image is {width}x{height}; both sides must be at least {min_side} px",
        )
    return image


def read_header(data: bytes, max_pixels: int, min_side: int) -> ImageHeader:
    """Check an upload from its header alone (no pixels decoded); raises ``UnusableImage`` as ``decode_image``
    would, except for damage past the header (found when the pixels are decoded)."""
    with open_image(data, max_pixels, min_side) as image:
        return _header(image, data)


def decode_image(
    data: bytes, max_pixels: int, min_side: int, at_least: int | None = None, contiguous: bool = True
) -> DecodedImage:
    """Decode an upload; raises ``UnusableImage`` for anything but a usable image.
    ``at_least``: a JPEG may be decoded at a reduced scale whose sides are both at least this
    (``reduced_scale``); width/height are then the decoded pixels', not the header's. ``contiguous``:
    as ``model.preprocess.pil_to_rgb``'s (False: a channels-last view, no copy)."""
    with open_image(data, max_pixels, min_side) as image:
        if at_least is not None:
            reduced_scale(image, at_least)
        return _decode(image, contiguous)


def decode_pixels(data: bytes, at_least: int | None = None) -> Tensor:
    """uint8 RGB Tensor[3, H, W] of an upload whose header already passed the checks (the engine's PIL
    decode; ``at_least`` as ``decode_image``'s), channels-last (a view over PIL's [H, W, 3] pixels, which
    ``model.preprocess.preprocess`` resizes fastest on a CPU); ``UnusableImage`` (``INVALID``) if it is damaged."""
    return decode_image(data, max_pixels=1 << 62, min_side=1, at_least=at_least, contiguous=False).pixels


def reduced_scale(image: Image.Image, at_least: int) -> None:
    """Let libjpeg decode ``image`` (opened, not loaded) at 1/2, 1/4 or 1/8 scale where both sides stay
    at least ``at_least`` pixels: the largest such reduction (PIL's ``draft``; the DCT is scaled, so the
    work shrinks with the pixel count). No effect on other formats, or where even 1/2 would go under
    (a 640x480 photo for a 320 input is decoded whole). The network warps every image to its square
    input, so only how the downscale is computed changes (docs/benchmarks.md measures the mAP)."""
    if image.format == "JPEG" and min(image.size) >= 2 * at_least:
        image.draft(image.mode, (at_least, at_least))


def _header(image: Image.Image, data: bytes) -> ImageHeader:
    fmt, mode = str(image.format), image.mode
    width, height = image.size
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)  # as ImageOps.exif_transpose reads it
    except Exception:  # damaged EXIF: left to PIL's decode, as before
        return ImageHeader(fmt, mode, width, height, 1, plain_jpeg=False)
    orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
    if orientation in (5, 6, 7, 8):  # transposed: width and height swap
        width, height = height, width
    plain_jpeg = (
        fmt == "JPEG"
        and mode in PLAIN_JPEG_MODES
        and "adobe" not in image.info  # APP14 colour transforms: libjpeg and nvJPEG may read them apart
        and _ends_with_eoi(data)  # a truncated JPEG goes to PIL, which answers 400 for it
    )
    return ImageHeader(fmt, mode, width, height, orientation, plain_jpeg)


def _ends_with_eoi(data: bytes) -> bool:
    """The JPEG end-of-image marker closes the data (trailing NUL / whitespace padding allowed)."""
    return data[-64:].rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def _decode(image: Image.Image, contiguous: bool = True) -> DecodedImage:
    try:
        image.load()
        pixels = pil_to_rgb(image, contiguous)
    except Exception as exc:  # decoders raise many types for damaged data
        log.info("undecodable %s upload: %s: %s", image.format, type(exc).__name__, exc)
        raise UnusableImage(
            ImageProblem.INVALID, f"the {image.format} image is truncated or corrupt"
        ) from None
    return DecodedImage(pixels, int(pixels.shape[2]), int(pixels.shape[1]), str(image.format))


def annotate(
    pixels: Tensor, detections: Sequence[dict], image_format: str = "jpeg", quality: int = 90
) -> bytes:
    """Draw detections (response dicts: label, class_id, score, box in pixels) on uint8 RGB Tensor[3, H, W]
    (``model.drawing.draw_detections``, as ``refinedet predict --annotate``) and encode it as JPEG or PNG."""
    canvas = draw_detections(pixels, detections)
    out = io.BytesIO()
    if image_format == "png":
        canvas.save(out, format="PNG", compress_level=3)
    else:
        canvas.save(out, format="JPEG", quality=quality)
    return out.getvalue()
