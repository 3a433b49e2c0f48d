"""Bad input gets a clear 4xx with an error code, never a 5xx, and the service stays healthy after it."""

from __future__ import annotations

import struct
import zlib

import pytest
from service_testing import encode, noise_image

from service.schemas import BatchResponse

JPEG = encode(noise_image(64, 48, seed=4))
GIF = encode(noise_image(16, 16, 0), "GIF")
MAX_UPLOAD = 20 * 1024 * 1024  # the default max_upload_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): costs bytes, not gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def raw(data: bytes, content_type: str = "image/jpeg") -> dict:
    return {"content": data, "headers": {"content-type": content_type}}


def as_file(data: bytes, field: str = "file", content_type: str = "image/jpeg") -> dict:
    return {"files": {field: ("upload", data, content_type)}}


CASES = {
    "empty raw body": (raw(b""), 400, "empty_image"),
    "empty body, no content type": ({"content": b""}, 400, "empty_image"),
    "empty file": (as_file(b""), 400, "empty_image"),
    "text file": (
        as_file(b"hello, this is not an image\n" * 20, content_type="text/plain"),
        400,
        "invalid_image",
    ),
    "text body": (raw(b"just text", "text/plain"), 415, "unsupported_media_type"),
    "body without content type": ({"content": JPEG}, 415, "unsupported_media_type"),
    "truncated jpeg": (as_file(JPEG[: len(JPEG) // 2]), 400, "invalid_image"),
    "jpeg header only": (as_file(JPEG[:20]), 400, "invalid_image"),
    "gif": (
        as_file(encode(noise_image(16, 16, 0), "GIF"), content_type="image/gif"),
        415,
        "unsupported_format",
    ),
    "tiff": (as_file(encode(noise_image(16, 16, 0), "TIFF")), 415, "unsupported_format"),
    "gif raw body": (raw(b"GIF89a....", "image/gif"), 415, "unsupported_media_type"),
    "1x1 image": (as_file(encode(noise_image(1, 1, 0), "PNG")), 422, "image_too_small"),
    "20000x20000 image": (as_file(png_header_only(20000, 20000)), 413, "image_too_large"),
    "8000x6000 image": (as_file(png_header_only(8000, 6000)), 413, "image_too_large"),
    "oversized upload": (raw(b"\xff\xd8" + b"\0" * MAX_UPLOAD), 413, "payload_too_large"),
    "oversized chunked upload": (
        {"content": iter([b"\0" * (1 << 20)] * 21), "headers": {"content-type": "image/jpeg"}},
        413,
        "payload_too_large",
    ),
    "wrong multipart field": (as_file(JPEG, field="photo"), 422, "missing_file"),
    "multipart text field": (
        {"data": {"file": "not a file"}, "files": {"other": ("x", b"x")}},
        422,
        "missing_file",
    ),
    "two files to /detect": (
        {"files": [("file", ("a", JPEG)), ("file", ("b", JPEG))]},
        422,
        "too_many_files",
    ),
    "broken multipart": (raw(b"--xx\r\nnot really", "multipart/form-data; boundary=xx"), 400, "bad_request"),
    "multipart without boundary": (raw(b"abc", "multipart/form-data"), 400, "bad_request"),
    "urlencoded form": (raw(b"file=abc", "application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
}

BAD_QUERIES = [
    {"score_threshold": "2"},
    {"score_threshold": "-0.1"},
    {"score_threshold": "abc"},
    {"score_threshold": "nan"},
    {"max_detections": "0"},
    {"max_detections": "100000"},
    {"max_detections": "1.5"},
    {"format": "xml"},
    {"classes": "cat"},
]


def assert_still_healthy(client) -> None:
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    r = client.post("/detect", **as_file(JPEG))
    assert r.status_code == 200 and r.json()["image"] == {"width": 64, "height": 48}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_upload_gets_a_clear_4xx(client, name):
    kwargs, status, code = CASES[name]
    r = client.post("/detect", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10


@pytest.mark.parametrize("params", BAD_QUERIES, ids=[next(iter(q.items())).__str__() for q in BAD_QUERIES])
def test_invalid_query_values_get_422(client, params):
    r = client.post("/detect", params=params, **as_file(JPEG))
    assert r.status_code == 422, (params, r.text)
    assert r.json()["error"]["code"] in ("invalid_request", "unknown_class")


def test_a_bad_file_fails_alone_in_a_batch(client):
    """Each file of /detect/batch gets its own answer: detections for the good ones, the 4xx /detect would
    have given for each bad one (truncated, not an image, unsupported format), in upload order."""
    files = [
        ("files", ("good.jpg", JPEG)),
        ("files", ("truncated.jpg", JPEG[:100])),
        ("files", ("anim.gif", GIF)),
        ("files", ("again.jpg", JPEG)),
    ]
    r = client.post("/detect/batch", files=files)
    assert r.status_code == 200, r.text
    body = BatchResponse.model_validate(r.json())
    assert [(i.filename, i.status) for i in body.results] == [
        ("good.jpg", 200),
        ("truncated.jpg", client.post("/detect", **as_file(JPEG[:100])).status_code),
        ("anim.gif", client.post("/detect", **as_file(GIF)).status_code),
        ("again.jpg", 200),
    ]
    assert body.failed == 2
    good, truncated, gif, again = body.results
    assert good.detections == again.detections and good.image is not None and good.error is None
    assert truncated.error and truncated.detections is None and len(truncated.error.message) > 10
    assert gif.error and gif.error.code != truncated.error.code and "GIF" in gif.error.message
    too_many = [("files", (f"{i}.jpg", JPEG)) for i in range(17)]
    assert client.post("/detect/batch", files=too_many).status_code == 400  # the request itself is wrong


def test_a_batch_of_only_bad_files_is_answered_file_by_file(client):
    r = client.post("/detect/batch", files=[("files", ("a.jpg", b"x" * 50)), ("files", ("b.jpg", b""))])
    assert r.status_code == 200 and r.json()["failed"] == 2
    assert all(item["status"] >= 400 and item["error"]["message"] for item in r.json()["results"])


def test_unknown_routes_and_methods(client):
    assert client.get("/detect").status_code == 405
    assert client.get("/nothing-here").json()["error"]["code"] == "not_found"


def test_service_is_healthy_after_all_of_it(client):
    for kwargs, _, _ in CASES.values():
        if not isinstance(kwargs.get("content"), bytes | type(None)):
            continue  # generators are consumed; sent once above
        assert client.post("/detect", **kwargs).status_code < 500
    assert_still_healthy(client)
    metrics = client.get("/metrics").text
    assert 'route="/detect",status="5' not in metrics  # no detect request of this session got a 5xx
