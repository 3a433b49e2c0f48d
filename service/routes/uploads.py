"""Reading image uploads from a request: multipart fields or the raw body with an image content type."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import ServiceError
from service.imaging import SUPPORTED_TEXT, DecodedImage, check_media_type, decode_image
from service.settings import Settings

SINGLE_FIELDS = ("file", "image")
BATCH_FIELDS = ("files", "file", "images", "image")
RAW_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream")
_BINARY = {"type": "string", "format": "binary"}


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
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
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


async def decode_uploads(uploads: list[Upload], settings: Settings) -> list[tuple[DecodedImage, float]]:
    """Decode every upload off the event loop; returns (image, decode ms) each. A failing file names itself."""

    def decode(upload: Upload) -> tuple[DecodedImage, float]:
        start = time.perf_counter()
        image = decode_image(upload.data, settings.max_image_pixels, settings.min_image_side)
        return image, (time.perf_counter() - start) * 1e3

    results = await asyncio.gather(*(asyncio.to_thread(decode, u) for u in uploads), return_exceptions=True)
    for index, (upload, result) in enumerate(zip(uploads, results, strict=True)):
        if isinstance(result, ServiceError):
            if len(uploads) > 1:
                name = upload.filename or f"#{index}"
                raise ServiceError(result.status, result.code, f"file {index} ({name}): {result.message}")
            raise result
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]
