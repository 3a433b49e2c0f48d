"""The service under a real uvicorn server on 127.0.0.1 and a free port: concurrent clients each get
their own image's answer while batches form, OpenAPI-driven fuzzing finds no 5xx, a client that left
is dropped before inference, and shutdown finishes in-flight requests."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_testing import (
    assert_same_detections,
    direct_detections_many,
    encode,
    gated_loader,
    noise_image,
    serving,
    settings,
    standin_loader,
)

from service.app import create_app
from service.settings import Settings

THRESHOLD = 0.3


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_concurrent_clients_get_their_own_answers_and_batches_form(tiny_backend, tiny_model):
    clients, per_client = 6, 2
    sizes = {(c, k): (56 + 8 * c, 40 + 16 * k + 2 * c) for c in range(clients) for k in range(per_client)}
    images = {
        key: encode(noise_image(w, h, seed=100 + 10 * key[0] + key[1])) for key, (w, h) in sizes.items()
    }
    expected = dict(
        zip(images, direct_detections_many(tiny_model, list(images.values()), THRESHOLD), strict=True)
    )
    app = create_app(settings(max_batch_size=4, max_delay_ms=300), loader=lambda s: tiny_backend)
    with serving(app) as (url, _):
        start = threading.Barrier(clients)

        def client(c: int) -> dict:
            answers = {}
            with httpx.Client(base_url=url, timeout=60) as http:
                start.wait()
                for k in range(per_client):
                    files = {"file": (f"{c}-{k}.jpg", images[c, k], "image/jpeg")}
                    answers[c, k] = http.post("/detect", params={"score_threshold": THRESHOLD}, files=files)
            return answers

        with ThreadPoolExecutor(clients) as pool:
            answers = {key: r for part in pool.map(client, range(clients)) for key, r in part.items()}
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    for key, r in answers.items():
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"] == {"width": sizes[key][0], "height": sizes[key][1]}
        assert_same_detections(body["detections"], expected[key])
    batches = metrics["refinedet_batch_size_count", ()]
    images_run = metrics["refinedet_batch_size_sum", ()]
    single = metrics["refinedet_batch_size_bucket", (("le", "1.0"),)]
    assert images_run == clients * per_client
    assert single < batches < images_run, "no batch larger than 1 formed"


def test_openapi_fuzzing_finds_no_server_errors(tmp_path):
    pytest.importorskip("schemathesis")
    app = create_app(
        settings(
            enable_benchmark=True, benchmark_max_iterations=3, max_batch_size=2, max_image_pixels=1_000_000
        ),
        loader=standin_loader(),
    )
    with serving(app) as (url, _):
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
            "--checks", "not_a_server_error", "--phases", "coverage,fuzzing", "--max-examples", "10",
            "--seed", "7", "--workers", "1", "--no-shrink", "--request-timeout", "30",
        ]  # fmt: skip
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={"NO_COLOR": "1", "PATH": ""},
        )
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    statuses = {}
    for (name, labels), value in metrics.items():
        if name == "refinedet_http_requests_total":
            status = dict(labels)["status"]
            statuses[status] = statuses.get(status, 0) + value
    assert sum(statuses.values()) > 200, statuses  # the fuzzer really sent requests
    assert not [s for s in statuses if s.startswith("5") and s != "503"], statuses
    assert "200" in statuses and any(s.startswith("4") for s in statuses)


def held_engine(loader) -> tuple[threading.Event, threading.Event]:
    """Make the stand-in's engine block inside ``infer`` until ``release`` is set; ``busy`` is set once a
    batch is in there. The tests wait on these events instead of sleeping for the engine."""
    busy, release = threading.Event(), threading.Event()
    infer = loader.backend.infer

    def held(images):
        busy.set()
        assert release.wait(30), "the test never released the engine"
        return infer(images)

    loader.backend.infer = held
    return busy, release


def poll(predicate, timeout_s: float = 10.0):
    """``predicate()``'s first truthy value, asked every 10 ms until the deadline (then the last value)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_cpu_streams_run_requests_at_once_each_as_soon_as_a_slot_is_free():
    """CPU_STREAMS=2: two requests are in the engine at once (each a batch of one); a third waits for a
    slot and runs the moment either is free, not when both are."""
    loader = gated_loader(max_batch=1)
    engine = loader.backend
    app = create_app(settings(cpu_streams=2), loader=loader)
    assert Settings(device="cpu", cpu_streams=2).serving_for("cpu").max_batch == 1
    with serving(app) as (url, _):
        send = {"content": encode(noise_image(64, 48, seed=9)), "headers": {"content-type": "image/jpeg"}}
        pool = ThreadPoolExecutor(3)
        pending = [pool.submit(httpx.post, f"{url}/detect", timeout=30, **send) for _ in range(3)]
        depth = ("refinedet_queue_depth", ())
        assert poll(lambda: engine.held == 2 and metric_samples(httpx.get(f"{url}/metrics").text)[depth] == 1)
        engine.release(1)  # one slot frees: the third request goes in while the other is still held
        assert poll(lambda: sum(p.done() for p in pending) == 1 and engine.held == 2)
        engine.release(2)
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert engine.calls == [1, 1, 1]


def test_a_client_that_left_is_dropped_before_inference():
    loader = standin_loader()
    busy, release = held_engine(loader)
    image = encode(noise_image(64, 48, seed=5))
    app = create_app(settings(max_batch_size=1, max_delay_ms=0), loader=loader)
    with serving(app) as (url, _):
        send = {"content": image, "headers": {"content-type": "image/jpeg"}}
        first = ThreadPoolExecutor(1).submit(httpx.post, f"{url}/detect", timeout=30, **send)
        assert busy.wait(30)  # the first request occupies the engine
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/detect", timeout=0.2, **send)  # gives up while queued
        release.set()
        assert first.result().status_code == 200
        gone = ("refinedet_dropped_requests_total", (("reason", "client_gone"),))
        metrics = poll(lambda: (m := metric_samples(httpx.get(f"{url}/metrics").text)).get(gone) and m)
    assert metrics and metrics[gone] == 1
    assert loader.backend.calls == [1]  # only the first request reached the network


def test_shutdown_finishes_in_flight_requests():
    loader = standin_loader()
    busy, release = held_engine(loader)
    image = encode(noise_image(64, 48, seed=6))
    app = create_app(settings(max_batch_size=1, max_delay_ms=0), loader=loader)
    with serving(app) as (url, server):
        send = {"content": image, "headers": {"content-type": "image/jpeg"}, "timeout": 30}
        pool = ThreadPoolExecutor(3)
        pending = [pool.submit(httpx.post, f"{url}/detect", **send) for _ in range(3)]
        assert busy.wait(30)  # one request is in the engine; wait until the other two are queued
        depth = ("refinedet_queue_depth", ())
        assert poll(lambda: metric_samples(httpx.get(f"{url}/metrics").text)[depth] == 2)
        server.should_exit = True  # what SIGTERM does
        release.set()
        answers = [p.result() for p in pending]

        def refused() -> bool:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
            except httpx.ConnectError:
                return True
            return False

        assert poll(refused), "the server still accepts connections after shutdown"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert loader.backend.calls == [1, 1, 1]


def test_uvicorn_runs_the_limited_protocol_and_outlasts_the_drain():
    """``refinedet serve``'s uvicorn options: the protocol with the connection/header limits, the keep-alive
    timeout, and a graceful timeout longer than the app's drain (so uvicorn never cancels a request
    itself, which would answer a bare 500)."""
    from service.server import DRAIN_MARGIN_S, uvicorn_options

    options = uvicorn_options(settings(graceful_timeout_s=7.5, keep_alive_timeout_s=3))
    assert options["http"] == "service.protocol:LimitedHttpToolsProtocol"
    assert options["ws"] == "none"  # no WebSocket routes: an upgrade is served as plain HTTP
    assert options["timeout_keep_alive"] == 3
    assert options["timeout_graceful_shutdown"] >= 7.5 + DRAIN_MARGIN_S
