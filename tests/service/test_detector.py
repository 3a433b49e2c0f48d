"""The BatchDetector's inputs: same-size images resized as one stacked batch (exactly the per-image result),
encoded uploads decoded in the engine (the same detections as PIL-decoded pixels), an undecodable
upload answered in its own place while the rest of the batch is detected, and how concurrent calls
share a CPU engine's threads."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from service_testing import corrupt_huffman_table, encode, noise_image

from model.preprocess import pil_to_rgb, preprocess
from service.detector import BatchDetector, ImageDetections, stack_if_same_size
from service.imaging import ImageProblem, UnusableImage, read_header


def pixels_of(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return pil_to_rgb(im)


def encoded(data: bytes):
    return read_header(data, 40_000_000, 8).deferred(data)


@pytest.mark.parametrize(("size", "count"), [(64, 1), (64, 5), (320, 3)])
def test_stacked_resize_equals_the_per_image_resize_exactly(tiny_backend, size, count):
    norm = tiny_backend.loaded_config.normalization
    images = [torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(count)]  # fmt: skip
    stacked = stack_if_same_size(images)
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (count, 3, 61, 83)
    assert torch.equal(preprocess(stacked, size, norm), preprocess(images, size, norm))


@pytest.mark.gpu
def test_stacked_resize_equals_the_per_image_resize_on_cuda(tiny_backend):
    norm = tiny_backend.loaded_config.normalization
    images = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, device="cuda") for _ in range(4)]
    assert torch.equal(preprocess(stack_if_same_size(images), 320, norm), preprocess(images, 320, norm))


def test_mixed_sizes_stay_a_list():
    images = [torch.zeros(3, 10, 12, dtype=torch.uint8), torch.zeros(3, 12, 10, dtype=torch.uint8)]
    assert stack_if_same_size(images) is images


def test_encoded_jpegs_give_the_detections_of_decoded_pixels(tiny_backend):
    """On the CPU decode_jpeg and PIL are the same libjpeg-turbo decode, so the results are equal."""
    datas = [encode(noise_image(96, 72, seed=s)) for s in (11, 12)] + [encode(noise_image(80, 60, seed=13))]
    detector = BatchDetector(tiny_backend)
    want = detector([pixels_of(d) for d in datas])
    got = detector.detect([encoded(datas[0]), pixels_of(datas[1]), encoded(datas[2])])
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, ImageDetections) and len(w.scores) > 0
        assert torch.equal(g.boxes_xyxy, w.boxes_xyxy) and torch.equal(g.scores, w.scores)
        assert torch.equal(g.labels, w.labels)
    assert got[0].times.batch_size == 3


def test_an_undecodable_upload_fails_in_its_place_only(tiny_backend):
    good = [encode(noise_image(96, 72, seed=s)) for s in (21, 22)]
    bad = corrupt_huffman_table(good[0])
    detector = BatchDetector(tiny_backend)
    want = detector([pixels_of(d) for d in good])
    got = detector.detect([encoded(good[0]), encoded(bad), encoded(good[1])])
    assert isinstance(got[1], UnusableImage) and got[1].problem == ImageProblem.INVALID
    for g, w in zip((got[0], got[2]), want, strict=True):
        assert isinstance(g, ImageDetections) and torch.equal(g.scores, w.scores)
    assert got[0].times.batch_size == 2  # the bad one never reached the network
    only_bad = detector.detect([encoded(bad)])
    assert len(only_bad) == 1 and isinstance(only_bad[0], UnusableImage)


def test_a_call_alone_gets_every_thread_and_a_concurrent_one_one_thread(tiny_backend, monkeypatch):
    """cpu_streams=2: the first call (alone) runs with all the engine's threads; a call that starts while
    it runs gets one thread (and the backend's one-thread infer); alone again, all threads. The answers
    are the plain detector's (the tolerance covers one thread's other summation order)."""
    datas = [encode(noise_image(96, 72, seed=s)) for s in (31, 32)]
    inputs = [pixels_of(datas[0]), encoded(datas[1])]
    want = BatchDetector(tiny_backend).detect(inputs)
    before = torch.get_num_threads()
    seen: list[int] = []
    inside, release = threading.Event(), threading.Event()
    real = tiny_backend.infer

    def infer(x):
        seen.append(torch.get_num_threads())
        if len(seen) == 1:  # the first call holds on until the second has run
            inside.set()
            assert release.wait(30)
        return real(x)

    monkeypatch.setattr(tiny_backend, "infer", infer)
    try:
        torch.set_num_threads(2)
        detector = BatchDetector(tiny_backend, cpu_streams=2)
        assert detector.cpu_share is not None and detector.cpu_share.threads == 2
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(detector.detect, inputs)
            assert inside.wait(30)
            second = detector.detect(inputs)
            release.set()
            answers = [first.result(30), second, detector.detect(inputs)]
        assert seen == [2, 1, 2]
    finally:
        torch.set_num_threads(before)
    for got in answers:
        for g, w in zip(got, want, strict=True):
            assert isinstance(g, ImageDetections) and isinstance(w, ImageDetections) and len(w.scores) > 0
            assert torch.equal(g.labels, w.labels)
            torch.testing.assert_close(g.scores, w.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(g.boxes_xyxy, w.boxes_xyxy, atol=1e-5, rtol=0)


def test_a_single_image_keeps_its_strides():
    pixels = torch.zeros(40, 30, 3, dtype=torch.uint8).permute(2, 0, 1)  # channels-last, as decoded
    batch = stack_if_same_size([pixels])
    assert isinstance(batch, torch.Tensor) and batch.shape == (1, 3, 40, 30)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_pytorch_parts_run_on_one_thread_beside_an_artifact_runtime(tiny_backend, monkeypatch):
    """An artifact backend's network has its own threads: resize and post-processing run on one PyTorch
    thread, and the caller's thread count is as it was afterwards. A PyTorch network keeps them all."""
    seen: list[int] = []
    real = tiny_backend.infer
    monkeypatch.setattr(tiny_backend, "infer", lambda x: seen.append(torch.get_num_threads()) or real(x))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        BatchDetector(tiny_backend).detect([torch.zeros(3, 50, 60, dtype=torch.uint8)])
        monkeypatch.setattr(tiny_backend, "name", "onnxruntime")
        for streams in (1, 2):
            BatchDetector(tiny_backend, cpu_streams=streams).detect(
                [torch.zeros(3, 50, 60, dtype=torch.uint8)]
            )
        assert seen == [2, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_large_jpeg_is_decoded_reduced_and_detected_in_the_whole_images_frame(tiny_backend):
    """At least 64: a 512x384 upload is decoded at 1/4 (128x96, both sides >= 64); the detections are
    normalised, so the route maps them onto the header's 512x384. By default: whole."""
    data = encode(noise_image(512, 384, seed=5))
    reduced, whole = BatchDetector(tiny_backend, decode_at_least=64), BatchDetector(tiny_backend)
    assert reduced.decode([encoded(data)])[0].shape == (3, 96, 128)
    assert whole.decode([encoded(data)])[0].shape == (3, 384, 512)
    [result] = reduced.detect([encoded(data)])
    assert isinstance(result, ImageDetections) and len(result.scores) > 0
    assert encoded(data).width == 512  # what to_pixels maps the boxes with
