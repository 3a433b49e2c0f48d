"""Uploads -> uint8 RGB tensors (``model.preprocess.pil_to_rgb``), with the limits that keep bad or
hostile input a clear 4xx: empty (400), undecodable or truncated (400), another image format (415),
more pixels than allowed (413, checked from the header before anything is decoded, so a
decompression bomb is never expanded), smaller than the minimum side (422). Also draws detections
onto an image for ``?format=image``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor

from model.preprocess import pil_to_rgb
from service.errors import ServiceError

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
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


@dataclass(frozen=True)
class DecodedImage:
    """pixels: uint8 RGB Tensor[3, H, W] after EXIF orientation; width/height are its W and H."""

    pixels: Tensor
    width: int
    height: int
    format: str


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


def check_media_type(content_type: str | None) -> None:
    """A raw request body must declare a supported image type (415 otherwise)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in SUPPORTED_MEDIA_TYPES and media != "application/octet-stream":
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'!r} is not supported: send a {SUPPORTED_TEXT} image as multipart "
            "field 'file' or as the raw body with an image/* content type",
        )


def decode_image(data: bytes, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode an upload; raises ServiceError (400/413/415/422) for anything but a usable image."""
    if not data:
        raise ServiceError(400, "empty_image", f"the upload is empty: send a {SUPPORTED_TEXT} image")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        raise ServiceError(413, "image_too_large", f"image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        other = sniff_other_format(data)
        if other:
            raise ServiceError(
                415, "unsupported_format", f"{other} images are not supported: send {SUPPORTED_TEXT}"
            ) from None
        raise ServiceError(
            400, "invalid_image", f"the upload is not a decodable {SUPPORTED_TEXT} image"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ServiceError(
                413, "image_too_large", f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
            )
        if min(width, height) < min_side:
            raise ServiceError(
                422,
                "image_too_small",
                f"image is {width}x{height}; both sides must be at least {min_side} px",
            )
        try:
            image.load()
            pixels = pil_to_rgb(image)
        except Exception as exc:  # decoders raise many types for damaged data
            raise ServiceError(
                400, "invalid_image", f"the {image.format} image is truncated or corrupt ({exc})"
            ) from None
        fmt = str(image.format)
    return DecodedImage(pixels, int(pixels.shape[2]), int(pixels.shape[1]), fmt)


def annotate(pixels: Tensor, detections: Sequence[dict], quality: int = 90) -> bytes:
    """Draw detections (response dicts: label, class_id, score, box in pixels) on uint8 RGB Tensor[3, H, W]
    and encode as JPEG."""
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 250))
    for det in detections:
        box = det["box"]
        color = PALETTE[det["class_id"] % len(PALETTE)]
        xy = (box["x1"], box["y1"], box["x2"], box["y2"])
        draw.rectangle(xy, outline=color, width=width)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((xy[0], xy[1]), text)
        label_top = max(0.0, xy[1] - (bottom - top) - 2)
        draw.rectangle(
            (xy[0], label_top, xy[0] + (right - left) + 4, label_top + (bottom - top) + 2), fill=color
        )
        draw.text((xy[0] + 2, label_top), text, fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
