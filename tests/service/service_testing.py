"""Helpers for the service tests (fixtures are in conftest.py).

- ``StandInBackend``: a cheap network with RefineDet's output contract (~1 ms), for tests that send many
  requests (fuzzing, shutdown) where the network's cost would only slow them down.
- ``running(app)``: app in-process (TestClient) once ready; ``serving(app)``: the app under a real
  uvicorn server on 127.0.0.1 and a free port, in a thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from model.anchors import generate_anchors
from model.config import RefineDetConfig, preset
from model.network import RefineDetOutput
from model.postprocess import PostProcessor, to_pixels
from model.preprocess import pil_to_rgb, preprocess
from model.runtime.plan import EnginePlan
from service.app import create_app
from service.backends.base import Backend, ModelInfo
from service.settings import Settings

CLASSES = ("a", "b")


def tiny_config() -> RefineDetConfig:
    return preset("refinedet320_vgg16", input_size=64, class_names=CLASSES)


class StandIn(nn.Module):
    """images [B, 3, S, S] -> RefineDet-shaped raw outputs from 8x8 average-pooled pixels."""

    def __init__(self, config: RefineDetConfig) -> None:
        super().__init__()
        self.a, self.sizes = config.num_anchors, [4, 2, 4, config.num_classes]
        self.fc = nn.Linear(3 * 64, self.a * sum(self.sizes))

    def forward(self, images: torch.Tensor) -> RefineDetOutput:
        pooled = nn.functional.adaptive_avg_pool2d(images, 8).flatten(1) / 64.0
        y = self.fc(pooled).reshape(images.shape[0], self.a, -1)
        return RefineDetOutput(*torch.split(y, self.sizes, dim=-1))


class StandInBackend(Backend):
    name = "torch"

    def __init__(self, max_batch: int = 8, delay_s: float = 0.0) -> None:
        super().__init__(torch.device("cpu"), max_batch)
        self.delay_s = delay_s
        self.calls: list[int] = []

    @property
    def precision(self) -> str:
        return "fp32"

    def load(self) -> None:
        torch.manual_seed(0)
        self.config = tiny_config()
        self.net = StandIn(self.config).eval()
        self.anchors = generate_anchors(self.config)
        self.info = ModelInfo("standin", None, None, False, "stand-in network for tests")

    @torch.inference_mode()
    def infer(self, images: torch.Tensor) -> RefineDetOutput:
        self.calls.append(images.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.net(images)


class GatedBackend(StandInBackend):
    """A stand-in whose every batch waits for a permit (``release(n)`` lets n batches run); ``running`` is
    set while a batch waits, so tests know the engine is busy without sleeping."""

    def __init__(self, max_batch: int = 8, delay_s: float = 0.0) -> None:
        super().__init__(max_batch, delay_s)
        self.permits = threading.Semaphore(0)
        self.running = threading.Event()
        self.held = 0  # batches waiting for a permit now
        self._lock = threading.Lock()

    def release(self, batches: int = 1) -> None:
        self.permits.release(batches)

    @torch.inference_mode()
    def infer(self, images: torch.Tensor) -> RefineDetOutput:
        with self._lock:
            self.held += 1
        self.running.set()
        try:
            if not self.permits.acquire(timeout=60):
                raise RuntimeError("the test never let this batch run")
        finally:
            with self._lock:
                self.held -= 1
        self.running.clear()
        return super().infer(images)


def fixed_loader(backend):
    """A loader that loads ``backend`` once and returns it for any settings (also ``loader.backend``)."""
    backend.load()

    def loader(settings: Settings):
        return backend

    loader.backend = backend  # type: ignore[attr-defined]
    return loader


def gated_loader(max_batch: int = 1, delay_s: float = 0.0):
    """A loader returning one loaded GatedBackend (``loader.backend``)."""
    return fixed_loader(GatedBackend(max_batch, delay_s))


def poll(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Wait until ``condition()`` is true (checked every 10 ms), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def standin_loader(max_batch: int = 8, delay_s: float = 0.0):
    """A loader returning one loaded StandInBackend (also reachable as ``loader.backend``)."""
    return fixed_loader(StandInBackend(max_batch, delay_s))


def settings(**changes) -> Settings:
    # One engine slot unless a test asks for more: the gated tests count batches one at a time.
    base = {
        "device": "cpu",
        "max_delay_ms": 1.0,
        "warmup_iterations": 0,
        "access_log": False,
        "cpu_streams": 1,
    }
    return Settings(**{**base, **changes})


def wait_ready(get, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("service did not become ready")


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[tuple[str, object]]:
    """Run ``app`` under uvicorn on 127.0.0.1:<free port> in a thread, with the options ``refinedet serve``
    uses (``service.server.uvicorn_options``); yields (base URL, uvicorn.Server)."""
    import httpx
    import uvicorn

    from service.server import uvicorn_options

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = uvicorn_options(app.state.service.settings)  # the service's protocol, timeouts and drain
    served = {k: options[k] for k in ("http", "ws", "timeout_keep_alive", "timeout_graceful_shutdown")}
    config = uvicorn.Config(app, log_level="warning", access_log=False, **served)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 30
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.01)
            wait_ready(client.get)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def corrupt_huffman_table(jpeg: bytes) -> bytes:
    """The JPEG with an impossible first Huffman table: its header reads fine (so the engine is given it),
    but every decoder (libjpeg-turbo, PIL, nvJPEG) fails on it."""
    bad = bytearray(jpeg)
    at = jpeg.index(b"\xff\xc4") + 5  # DHT marker, length, class/id, then the 16 code counts
    bad[at : at + 16] = b"\xff" * 16
    return bytes(bad)


def direct_detections(model, data: bytes, score_threshold: float, max_detections: int = 100) -> list[dict]:
    """The shared post-processing run directly on ``data``: decode, preprocess, network, PostProcessor,
    to_pixels; the reference the service's answers must equal."""
    return direct_detections_many(model, [data], score_threshold, max_detections)[0]


def direct_detections_many(
    model, datas: list[bytes], score_threshold: float, max_detections: int = 100
) -> list[list[dict]]:
    """``direct_detections`` for several images in one network call."""
    pixels = []
    for data in datas:
        with Image.open(io.BytesIO(data)) as im:
            pixels.append(pil_to_rgb(im))
    cfg = model.config
    with torch.inference_mode():
        dets = PostProcessor(cfg)(model(preprocess(pixels, cfg.input_size, cfg.normalization)), model.anchors)
    results = []
    for i, p in enumerate(pixels):
        boxes, scores, labels = dets.image(i, score_threshold)
        boxes = to_pixels(boxes, p.shape[2], p.shape[1])[:max_detections]
        results.append(
            [
                {"label": cfg.class_names[int(lab) - 1], "score": float(s), "box": b.tolist()}
                for b, s, lab in zip(boxes, scores[:max_detections], labels[:max_detections], strict=True)
            ]
        )
    return results


def assert_same_detections(
    got: list[dict], want: list[dict], box_tol: float = 0.02, score_tol: float = 1e-4
) -> None:
    """Service JSON detections == reference detections (order, labels, scores, pixel boxes)."""
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        assert abs(g["score"] - w["score"]) <= score_tol, (g, w)
        box = [g["box"][k] for k in ("x1", "y1", "x2", "y2")]
        assert np.allclose(box, w["box"], atol=box_tol), (box, w["box"])


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one response; reads until the server closes or the body is in."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without a complete response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


def plan_for(s: Settings, backend: str | None = None) -> EnginePlan:
    """The engine plan ``deploy.prepare`` would hand the service for ``s.model`` as it is (no export, no CPU
    engine decision: the tests serve their files directly), built by deploy's own constructor."""
    from deploy.prepare import plan
    from model.artifacts import file_kind, read_manifest

    kind = file_kind(s.model) if s.model is not None else "checkpoint"
    chosen = backend or ({"checkpoint": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}[kind]
                         if s.backend == "auto" else s.backend)  # fmt: skip
    precision = "fp32" if kind == "checkpoint" else read_manifest(s.model).precision  # type: ignore[arg-type]
    device = "cuda" if s.device == "cuda" or chosen == "tensorrt" else "cpu"
    return plan(s, s.model, chosen, device, precision)


def app_for(s: Settings, **kwargs: Any) -> FastAPI:
    """``create_app`` serving ``plan_for(s)``."""
    return create_app(s, plan=plan_for(s), **kwargs)
