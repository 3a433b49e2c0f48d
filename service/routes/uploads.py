"""Reading image uploads from a request: multipart fields or the raw body with an image content type."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.admission import current_reserver
from service.decoding import UploadDecoding
from service.errors import ServiceError
from service.imaging import (
    SUPPORTED_TEXT,
    DecodedImage,
    EncodedImage,
    UnusableImage,
    check_media_type,
    decode_image,
    media_type,
    read_header,
)
from service.settings import Settings

SINGLE_FIELDS = ("file", "image")
BATCH_FIELDS = ("files", "file", "images", "image")
RAW_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream")
_BINARY = {"type": "string", "format": "binary"}
# Uploads up to this size have their header read on the event loop (a photo's takes ~25 us, less than a
# hop to a thread; a hostile one padded with junk PIL skips byte by byte, ~20 ms per 64 KiB); larger
# ones are read in a worker thread.
INLINE_HEADER_BYTES = 128 * 1024
UploadedImage = DecodedImage | EncodedImage


def upload_body(fields: tuple[str, ...], many: bool, required: bool = True) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for an image as multipart field(s) or as the raw body."""
    item = {"type": "array", "items": _BINARY} if many else _BINARY
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": {f: item for f in fields}}},
    }
    if not many:
        content.update({media: {"schema": _BINARY} for media in RAW_MEDIA_TYPES})
    return {"requestBody": {"required": required, "content": content}}


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


async def read_uploads(request: Request, fields: tuple[str, ...], max_files: int) -> list[Upload]:
    """The uploaded image(s): multipart ``fields`` (in that order) or the raw body. 4xx for anything else."""
    media = media_type(request.headers.get("content-type"))
    if media == "multipart/form-data":
        return await _read_multipart(request, fields, max_files)
    body = await request.body()
    if not media and not body:
        raise ServiceError(400, "empty_image", f"the request has no body: send a {SUPPORTED_TEXT} image")
    check_media_type(media)
    return [Upload(body, None)]


async def _read_multipart(request: Request, fields: tuple[str, ...], max_files: int) -> list[Upload]:
    form = await request.form(max_files=max_files, max_fields=32)
    try:
        parts = [(name, value) for name in fields for value in form.getlist(name)]
        if not parts:
            got = ", ".join(sorted(set(form.keys()))) or "none"
            wanted = " or ".join(f"'{f}'" for f in fields)
            raise ServiceError(
                422, "missing_file", f"no image in multipart field {wanted} (fields received: {got})"
            )
        uploads = []
        for name, value in parts:
            if not isinstance(value, UploadFile):
                raise ServiceError(
                    422,
                    "missing_file",
                    f"multipart field '{name}' must be a file upload, e.g. curl -F {name}=@image.jpg",
                )
            uploads.append(Upload(await value.read(), value.filename))
        return uploads
    finally:
        await form.close()


async def read_images(
    uploads: list[Upload],
    settings: Settings,
    decoding: UploadDecoding,
    host_pixels: bool = False,
    reserve: Callable[[int], None] | None = None,
) -> list[tuple[UploadedImage, float]]:
    """Check every upload's header, then decode it here (off the event loop) or leave it encoded for the
    engine, as ``decoding`` says (never with ``host_pixels``: the request needs the pixels here); returns
    (image, ms spent here) each. A failing file names itself. ``reserve(width * height)`` is called for
    each image once its header passed the checks, before it is decoded here or queued for the engine
    (``service.admission.PixelBudget``: it raises 503 when over); by default the current request's
    (``service.admission.current_reserver``)."""
    limits = (settings.max_image_pixels, settings.min_image_side)
    reserve = reserve or current_reserver.get()

    async def read(upload: Upload) -> tuple[UploadedImage, float]:
        start = time.perf_counter()
        if len(upload.data) <= INLINE_HEADER_BYTES:
            header = read_header(upload.data, *limits)
        else:
            header = await asyncio.to_thread(read_header, upload.data, *limits)
        if reserve is not None:
            reserve(header.width * header.height)
        image: UploadedImage
        if decoding.in_engine(header, host_pixels):
            image = header.deferred(upload.data)
        else:
            image = await asyncio.to_thread(decode_image, upload.data, *limits)
        return image, (time.perf_counter() - start) * 1e3

    if len(uploads) == 1:
        return [await read(uploads[0])]
    results = await asyncio.gather(*map(read, uploads), return_exceptions=True)
    for index, (upload, result) in enumerate(zip(uploads, results, strict=True)):
        if isinstance(result, ServiceError | UnusableImage):
            raise name_file(result, index, upload.filename)
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def name_file(
    error: ServiceError | UnusableImage, index: int, filename: str | None
) -> ServiceError | UnusableImage:
    """``error`` for file ``index`` of a several-file request, its message naming the file."""
    name = filename or f"#{index}"
    return error.with_message(f"file {index} ({name}): {error.message}")
