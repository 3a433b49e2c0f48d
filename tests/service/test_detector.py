"""The Detector's inputs: same-size images resized as one stacked batch (exactly the per-image result),
encoded JPEGs decoded in the engine (the same detections as PIL-decoded pixels), and an undecodable
upload answered in its own place while the rest of the batch is detected."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from service_testing import corrupt_huffman_table, encode, noise_image

from model.preprocess import pil_to_rgb, preprocess
from service.detector import Detector, ImageDetections, stack_if_same_size
from service.errors import ServiceError
from service.imaging import read_header


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
    detector = Detector(tiny_backend)
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
    detector = Detector(tiny_backend)
    want = detector([pixels_of(d) for d in good])
    got = detector.detect([encoded(good[0]), encoded(bad), encoded(good[1])])
    assert isinstance(got[1], ServiceError) and (got[1].status, got[1].code) == (400, "invalid_image")
    for g, w in zip((got[0], got[2]), want, strict=True):
        assert isinstance(g, ImageDetections) and torch.equal(g.scores, w.scores)
    assert got[0].times.batch_size == 2  # the bad one never reached the network
    only_bad = detector.detect([encoded(bad)])
    assert len(only_bad) == 1 and isinstance(only_bad[0], ServiceError)


def test_cpu_streams_give_the_batch_results_in_order(tiny_backend):
    """A batch split over concurrent single-thread inferences answers each image as one call would
    (the network is per image; the tolerance covers the other summation order of one thread)."""
    datas = [encode(noise_image(96, 72, seed=s)) for s in range(31, 36)]
    bad = corrupt_huffman_table(datas[2])
    inputs = [encoded(datas[0]), pixels_of(datas[1]), encoded(bad), encoded(datas[3]), pixels_of(datas[4])]
    want = Detector(tiny_backend).detect(inputs)
    streamed = Detector(tiny_backend, cpu_streams=2)
    assert streamed.streams is not None and streamed.streams.count == 2
    threads = torch.get_num_threads()
    got = streamed.detect(inputs)
    assert isinstance(got[2], ServiceError) and len(got) == 5
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:], strict=True):
        assert isinstance(g, ImageDetections) and isinstance(w, ImageDetections) and len(w.scores) > 0
        assert torch.equal(g.labels, w.labels)
        torch.testing.assert_close(g.scores, w.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(g.boxes_xyxy, w.boxes_xyxy, atol=1e-5, rtol=0)
    assert [g.times.batch_size for g in got if isinstance(g, ImageDetections)] == [1, 1, 1, 1]  # one per run
    streamed.detect([pixels_of(datas[0])])  # a lone image runs on the engine thread with all its threads
    assert torch.get_num_threads() == threads


def test_cpu_streams_take_the_next_item_when_free():
    """A stream held up on one item does not hold up the others: they take the remaining items."""
    import threading

    from service.detector import CpuStreams

    streams = CpuStreams(2)
    slow_started, release = threading.Event(), threading.Event()
    done: list[int] = []

    def step(group):
        [x] = group
        if x == 0:
            slow_started.set()
            assert release.wait(30)
        else:
            assert slow_started.wait(30)
            done.append(x)
            if len(done) == 5:
                release.set()
        return [x * 10]

    assert streams.run(step, list(range(6))) == [x * 10 for x in range(6)]
    assert sorted(done) == [1, 2, 3, 4, 5]  # all run by the other stream while item 0 was held
