"""POST /detect and /detect/batch through HTTP, on the tiny RefineDet checkpoint: answers equal the
shared post-processing run directly on the same image, for every upload form and image format."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_testing import assert_same_detections, direct_detections, encode, noise_image

from model.drawing import PALETTE

IMAGE = encode(noise_image(96, 72, seed=1))
THRESHOLD = 0.3


def detect(client, data=IMAGE, params=None, **kwargs):
    kwargs.setdefault("files", {"file": ("a.jpg", data, "image/jpeg")})
    return client.post("/detect", params={"score_threshold": THRESHOLD, **(params or {})}, **kwargs)


MAX = 100  # the service's default max_detections


@pytest.fixture(scope="module")
def everything(tiny_model):
    """Every detection of the shared post-processing above THRESHOLD (not truncated)."""
    want = direct_detections(tiny_model, IMAGE, THRESHOLD, max_detections=10_000)
    assert len(want) >= 3, "the test image must produce a few detections"
    return want


@pytest.fixture(scope="module")
def reference(everything):
    return everything[:MAX]


def test_detections_equal_direct_postprocessing(client, reference):
    r = detect(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 96, "height": 72}
    assert_same_detections(body["detections"], reference)
    assert {d["class_id"] for d in body["detections"]} <= {0, 1}
    assert all(d["label"] == ("a", "b")[d["class_id"]] for d in body["detections"])


def test_every_upload_form_gives_the_same_answer(client, reference):
    forms = [
        {"files": {"image": ("a.jpg", IMAGE, "image/jpeg")}},
        {"content": IMAGE, "headers": {"content-type": "image/jpeg"}},
        {"content": IMAGE, "headers": {"content-type": "application/octet-stream"}},
    ]
    for form in forms:
        if "content" in form:
            form["files"] = None
        r = client.post("/detect", params={"score_threshold": THRESHOLD}, **form)
        assert r.status_code == 200, (form.get("headers"), r.text)
        assert_same_detections(r.json()["detections"], reference)


def test_response_shape_timings_and_headers(client):
    r = detect(client, headers={"X-Request-ID": "req-42"})
    body = r.json()
    assert set(body) == {"detections", "image", "model", "timings_ms"}
    assert body["model"] == {
        "name": "refinedet320_vgg16",
        "backend": "torch",
        "device": "cpu",
        "precision": "fp32",
    }
    stages = ["decode", "preprocess", "queue", "inference", "postprocess", "total"]
    assert list(body["timings_ms"]) == stages and all(v >= 0 for v in body["timings_ms"].values())
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0
    assert [p.split(";")[0] for p in r.headers["server-timing"].split(", ")] == stages
    assert r.headers["x-request-id"] == "req-42"
    assert len(detect(client, headers={"X-Request-ID": "bad id\x01"}).headers["x-request-id"]) == 32


def test_query_options_filter_the_shared_result(client, everything, reference):
    """Threshold and classes filter the shared result; max_detections then keeps the best."""
    higher = detect(client, params={"score_threshold": 0.4}).json()["detections"]
    assert_same_detections(higher, [d for d in everything if d["score"] > 0.4][:MAX])
    top2 = detect(client, params={"max_detections": 2}).json()["detections"]
    assert_same_detections(top2, reference[:2])
    only_b = detect(client, params={"classes": "b"}).json()["detections"]
    assert_same_detections(only_b, [d for d in everything if d["label"] == "b"][:MAX])
    both = detect(client, params={"classes": ["A,b", "a"]}).json()["detections"]
    assert_same_detections(both, reference)


def test_annotated_image_instead_of_json(client, reference):
    for r in (detect(client, params={"format": "image"}), detect(client, headers={"Accept": "image/jpeg"})):
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert int(r.headers["x-detections"]) == len(reference)
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "JPEG" and im.size == (96, 72)
            drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
        with Image.open(io.BytesIO(IMAGE)) as im:
            plain = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert np.abs(drawn - plain).max() > 100  # boxes were drawn


def test_annotated_image_as_png(client, reference):
    """``format=png`` (or ``Accept: image/png``): the same drawing as the JPEG, without its losses."""
    jpeg = detect(client, params={"format": "jpeg"})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(jpeg.content)) as im:
        lossy = np.asarray(im.convert("RGB"), dtype=np.int16)
    with Image.open(io.BytesIO(IMAGE)) as im:
        plain = np.asarray(im.convert("RGB"), dtype=np.int16)
    for r in (detect(client, params={"format": "png"}), detect(client, headers={"Accept": "image/png"})):
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert int(r.headers["x-detections"]) == len(reference)
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.format == "PNG" and im.size == (96, 72)
            drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert np.abs(drawn - plain).max() > 100  # boxes were drawn
        # lossless: the boxes and label chips are their class colours exactly (the JPEG's are not)
        for class_id in {["a", "b"].index(d["label"]) for d in reference}:
            colour = np.array(PALETTE[class_id])
            assert (drawn == colour).all(axis=2).sum() > 50 > (lossy == colour).all(axis=2).sum()
    assert detect(client, params={"format": "gif"}).status_code == 422


def test_image_modes_formats_and_exif_orientation(client, tiny_model):
    """One batch request covering PNG/WebP/BMP, grayscale, alpha, palette, 16-bit and EXIF rotation."""
    base = noise_image(80, 64, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    gray16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    files = {
        "png": encode(base, "PNG"),
        "webp": encode(base, "WEBP", lossless=True),
        "bmp": encode(base, "BMP"),
        "gray": encode(base.convert("L"), "PNG"),
        "rgba": encode(base.convert("RGBA"), "PNG"),
        "palette": encode(base.convert("P"), "PNG"),
        "gray16": encode(gray16, "PNG"),
        "exif": encode(base, "JPEG", exif=exif),
    }
    multipart = [("files", (f"{name}.img", data, "application/octet-stream")) for name, data in files.items()]
    r = client.post("/detect/batch", params={"score_threshold": THRESHOLD}, files=multipart)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(files)
    for (name, data), result in zip(files.items(), results, strict=True):
        expected_size = {"width": 64, "height": 80} if name == "exif" else {"width": 80, "height": 64}
        assert result["image"] == expected_size, name
        if name == "gray16":  # rescaled to 8 bits: detections exist, compared exactly on the 8-bit cases
            assert result["detections"]
            continue
        assert_same_detections(result["detections"], direct_detections(tiny_model, data, THRESHOLD)[:MAX])
