"""Uploads decoded in the engine (``REFINEDET_ENGINE_DECODE``, on by default): on a CPU by PIL in the
engine slot that runs the request, which is also the plumbing of the CUDA path (nvJPEG, GPU-only test
below). Answers equal the handler-decoded path's, the annotated image still works, and a corrupt JPEG
in a batch of good ones answers 400 for itself only."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_testing import (
    app_for,
    assert_same_detections,
    corrupt_huffman_table,
    direct_detections,
    encode,
    noise_image,
    running,
    serving,
    settings,
)
from test_server import metric_samples

from model.runtime.plan import EnginePlan
from service.app import create_app
from service.decoding import JpegDecoder, UploadDecoding
from service.imaging import DecodedImage, EncodedImage
from service.routes.uploads import INLINE_HEADER_BYTES, Upload, read_images

THRESHOLD = 0.3
IMAGE = encode(noise_image(96, 72, seed=1))


@pytest.fixture(scope="module")
def engine_client(tiny_backend):
    app = create_app(settings(max_batch_size=4), loader=lambda s: tiny_backend)
    with running(app) as client:
        assert app.state.service.decoding == UploadDecoding("pil")
        yield client


def test_engine_decoded_answers_equal_the_pil_path(engine_client, tiny_model):
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {
        "rgb": IMAGE,
        "gray": encode(noise_image(64, 48, seed=2).convert("L")),
        "rotated": encode(noise_image(80, 64, seed=3), "JPEG", exif=exif),
    }
    for name, data in images.items():
        r = engine_client.post(
            "/detect", params={"score_threshold": THRESHOLD}, files={"file": ("a.jpg", data, "image/jpeg")}
        )
        assert r.status_code == 200, (name, r.text)
        want = direct_detections(tiny_model, data, THRESHOLD)
        assert len(want) >= 1, name
        assert_same_detections(r.json()["detections"], want)
    assert engine_client.post("/detect", params={"score_threshold": THRESHOLD}, content=IMAGE,
                              headers={"content-type": "image/jpeg"}).json()["image"] == {"width": 96, "height": 72}  # fmt: skip


def test_uploads_small_and_large_are_left_encoded_for_the_engine():
    """Small uploads' headers are read on the event loop, large ones' in a thread: both stay encoded when
    the engine decodes them; nvJPEG's engine leaves the PNG to the handler."""
    big = encode(noise_image(1000, 800, seed=5), "JPEG", quality=95)
    assert len(big) > INLINE_HEADER_BYTES >= len(IMAGE)
    uploads = [
        Upload(IMAGE, "a.jpg"),
        Upload(big, "b.jpg"),
        Upload(encode(noise_image(40, 30, 6), "PNG"), None),
    ]
    read = asyncio.run(read_images(uploads, settings(), UploadDecoding("nvjpeg")))
    assert [type(image) for image, _ in read] == [EncodedImage, EncodedImage, DecodedImage]
    assert (read[1][0].width, read[1][0].height) == (1000, 800) and all(ms >= 0 for _, ms in read)
    on_cpu = asyncio.run(read_images(uploads, settings(), UploadDecoding("pil")))
    assert [type(image) for image, _ in on_cpu] == [EncodedImage] * 3 and on_cpu[2][0].format == "PNG"
    plain = asyncio.run(read_images(uploads, settings(), UploadDecoding("handler")))
    assert [type(image) for image, _ in plain] == [DecodedImage] * 3
    drawn = asyncio.run(read_images(uploads[:1], settings(), UploadDecoding("pil"), host_pixels=True))
    assert isinstance(drawn[0][0], DecodedImage)


def test_annotated_image_is_still_drawn(engine_client):
    r = engine_client.post("/detect", params={"format": "image", "score_threshold": THRESHOLD},
                           files={"file": ("a.jpg", IMAGE, "image/jpeg")})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert int(r.headers["x-detections"]) >= 1
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (96, 72)


def test_a_file_the_engine_cannot_decode_fails_alone_in_a_batch(engine_client):
    """The header passes, the engine's decoder fails: that file gets its 400, the good one its detections."""
    files = [("files", ("good.jpg", IMAGE)), ("files", ("bad.jpg", corrupt_huffman_table(IMAGE)))]
    r = engine_client.post("/detect/batch", files=files)
    assert r.status_code == 200, r.text
    good, bad = r.json()["results"]
    assert (good["filename"], good["status"], bad["filename"], bad["status"]) == (
        "good.jpg",
        200,
        "bad.jpg",
        400,
    )
    assert good["image"] == {"width": 96, "height": 72} and "error" not in good
    assert bad["error"]["code"] == "invalid_image" and "detections" not in bad and r.json()["failed"] == 1
    assert engine_client.post("/detect", files={"file": ("a.jpg", IMAGE)}).status_code == 200


def test_a_corrupt_jpeg_fails_alone_in_a_shared_batch(tiny_backend):
    """Three clients at once, one batch (cut when it holds all three): the corrupt upload gets 400, the
    others 200."""
    app = create_app(
        settings(max_batch_size=3, max_delay_ms=10_000, cpu_streams=1), loader=lambda s: tiny_backend
    )
    bodies = [IMAGE, corrupt_huffman_table(IMAGE), encode(noise_image(64, 48, seed=7))]
    with serving(app) as (url, _):
        start = threading.Barrier(len(bodies))

        def post(body: bytes) -> httpx.Response:
            start.wait()
            return httpx.post(
                f"{url}/detect", content=body, headers={"content-type": "image/jpeg"}, timeout=30
            )

        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(post, bodies))
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    assert [a.status_code for a in answers] == [200, 400, 200], [a.text for a in answers]
    assert answers[1].json()["error"]["code"] == "invalid_image"
    assert metrics["refinedet_batch_size_count", ()] == 1 and metrics["refinedet_batch_size_sum", ()] == 3


def test_engine_decode_on_with_a_broken_nvjpeg_fails_the_load(tiny_backend, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("torchvision was built without nvJPEG")

    monkeypatch.setattr(JpegDecoder, "warmup", broken)
    nvjpeg = EnginePlan(None, "torch", "cpu", "torch-fp32", "fp32", 1, 1, 1, "nvjpeg")  # as on a GPU
    app = create_app(settings(engine_decode="on"), loader=lambda s: tiny_backend, plan=nvjpeg)
    with running_until_settled(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "nvJPEG" not in r.text  # the reason is for the log, not for clients
    assert "nvJPEG" in caplog.text


@contextlib.contextmanager
def running_until_settled(app) -> Iterator[TestClient]:
    """The app in-process, once its load has finished (ready or failed)."""
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while app.state.service.status == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        yield client


@pytest.mark.gpu
def test_cuda_service_decodes_jpegs_on_the_gpu(tiny_checkpoint):
    """auto on CUDA: JPEGs are decoded by nvJPEG in the engine; the answers are the PIL path's up to the
    decoders' pixel differences (a few levels), i.e. the same best detection within 0.02 in score."""
    from service.benchmark import synthetic_jpeg

    photo = synthetic_jpeg(640, 480)
    answers = {}
    for mode in ("auto", "off"):
        app = app_for(settings(model=tiny_checkpoint, device="cuda", max_batch_size=4, engine_decode=mode))
        with running(app) as client:
            assert app.state.service.decoding.engine == ("nvjpeg" if mode == "auto" else "handler")
            r = client.post("/detect", params={"score_threshold": 0.0}, content=photo,
                            headers={"content-type": "image/jpeg"})  # fmt: skip
            assert r.status_code == 200, r.text
            answers[mode] = r.json()
            drawn = client.post("/detect", params={"format": "image"}, files={"file": ("a.jpg", photo)})
            assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/jpeg"
    gpu, cpu = answers["auto"]["detections"], answers["off"]["detections"]
    assert answers["auto"]["image"] == {"width": 640, "height": 480} and gpu and cpu
    assert abs(gpu[0]["score"] - cpu[0]["score"]) < 0.02
