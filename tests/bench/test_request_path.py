"""The request-path benchmarks' pieces: Server-Timing parsing, stage rows, a module at a git revision
(the before/after comparison), and the upscaled photos of the decode-scale mAP check."""

from __future__ import annotations

import io
import subprocess

import pytest
from PIL import Image

from bench.common import REPO_ROOT
from bench.decode_scale import upscaled
from bench.request_path import module_at, server_timing, stage
from model.errors import UserError
from service.benchmark import synthetic_jpeg


def test_server_timing_header_is_parsed():
    assert server_timing("decode;dur=0.125, preprocess;dur=7.5,total;dur=452.000") == {
        "decode": 0.125, "preprocess": 7.5, "total": 452.0}  # fmt: skip
    assert server_timing("") == {}


def test_stage_rows_relate_to_the_network():
    row = stage("post-process", [3.0, 1.0, 2.0, 10.0], network_ms=20.0, note="1 torch thread")
    assert row == {"stage": "post-process", "p50_ms": 2.5, "mean_ms": 4.0, "vs_network": 0.125,
                   "note": "1 torch thread"}  # fmt: skip
    assert stage("x", [1.0], None)["vs_network"] is None


def test_a_module_is_loaded_as_it_was_at_a_revision():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    old = module_at(head, "model/preprocess.py")
    assert callable(old.preprocess) and old.__name__.startswith("_at_")
    with pytest.raises(UserError, match="git show"):
        module_at(head, "model/no_such_file.py")


def test_upscaled_photos_are_jpegs_of_the_factor():
    jpeg = synthetic_jpeg(80, 60)
    assert upscaled(jpeg, 1) is jpeg
    with Image.open(io.BytesIO(upscaled(jpeg, 3))) as im:
        assert (im.format, im.size) == ("JPEG", (240, 180))


def test_the_instant_network_answers_every_call_with_one_photos_outputs(tiny_checkpoint):
    import torch
    from fastapi.testclient import TestClient

    from bench.service_overhead import instant, minimal_app
    from service.backends.torch import TorchBackend

    backend = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=1)
    backend.load()
    calls = []
    real = backend.infer
    backend.infer = lambda x: calls.append(x) or real(x)
    fast = instant(backend, synthetic_jpeg(96, 64))
    first = fast.infer(torch.zeros(1, 3, 64, 64))
    assert fast.infer(torch.ones(1, 3, 64, 64)) is first and len(calls) == 1  # computed once
    assert fast.single_thread_infer()(torch.zeros(1, 3, 64, 64)) is first
    client = TestClient(minimal_app(fast))
    r = client.post("/detect", content=synthetic_jpeg(120, 90), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["image"] == {"width": 120, "height": 90}
    assert len(calls) == 1
