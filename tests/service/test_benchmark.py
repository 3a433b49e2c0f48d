"""POST /v1/benchmark's bounds (issue #25): a time budget, a pixel limit, one at a time and never while
detections are served, stopped when its client leaves or the server drains, so that it cannot keep
/detect waiting longer than one bounded run; and ``run_benchmark`` on its own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from service_testing import (
    StandInBackend,
    connect,
    encode,
    gated_loader,
    noise_image,
    poll,
    running,
    serving,
    settings,
    standin_loader,
)

from service.app import create_app
from service.benchmark import run_benchmark, synthetic_jpeg
from service.detector import BatchDetector

IMAGE = encode(noise_image(64, 48, seed=3))
SMALL = {"warmup": 0, "width": 64, "height": 48}
ENDLESS = {"iterations": 100_000, **SMALL}  # hours at the stand-in's 20 ms an iteration


def endless_settings(**changes):
    return settings(enable_benchmark=True, benchmark_max_iterations=100_000, request_timeout_s=120, **changes)


def detect(url: str, timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{url}/detect", content=IMAGE, headers={"content-type": "image/jpeg"}, timeout=timeout)


def test_a_benchmark_stops_at_its_time_budget_and_says_so():
    """Issue #25: a 500-iteration benchmark held the engine for 180 s. It now stops at BENCHMARK_MAX_S."""
    app = create_app(endless_settings(benchmark_max_s=0.5), loader=standin_loader(delay_s=0.02))
    with serving(app) as (url, _):
        r = httpx.post(f"{url}/v1/benchmark", params=ENDLESS, timeout=20)
        assert detect(url).status_code == 200
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stopped"] == "time_limit" and body["iterations_requested"] == 100_000
    assert 1 <= body["iterations"] < 100_000 and body["seconds"] < 10
    assert body["latency_ms"]["total"]["p50"] > 0


def test_a_benchmark_over_its_pixel_limit_is_refused():
    app = create_app(settings(enable_benchmark=True, benchmark_max_pixels=20_000), loader=standin_loader())
    posted = encode(noise_image(160, 130, seed=1))  # 20,800 pixels
    with running(app) as c:
        answers = {
            "over": c.post("/v1/benchmark", params={"iterations": 1, "width": 200, "height": 101}),
            "at": c.post("/v1/benchmark", params={"iterations": 1, "width": 200, "height": 100}),
            "batch": c.post("/v1/benchmark", params={"iterations": 1, "width": 100, "height": 100, "batch_size": 3}),
            "posted": c.post("/v1/benchmark", params={"iterations": 1}, files={"file": ("x.jpg", posted, "image/jpeg")}),
        }  # fmt: skip
    assert answers["at"].status_code == 200, answers["at"].text
    for name in ("over", "batch"):
        assert answers[name].status_code == 422, answers[name].text
        assert "BENCHMARK_MAX_PIXELS" in answers[name].json()["error"]["message"]
    assert answers["posted"].status_code == 413
    assert answers["posted"].json()["error"]["code"] == "image_too_large"


def test_a_second_benchmark_is_refused_at_once_while_one_runs():
    """Issue #25: concurrent 4096x4096 benchmarks each made and held their image while queueing for the
    engine (RSS 0.9 -> 2.9 GB). One runs at a time; the others are answered 429 at once."""
    loader = gated_loader(max_batch=1)
    app = create_app(settings(enable_benchmark=True), loader=loader)
    engine, state = loader.backend, app.state.service
    with serving(app) as (url, _), ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(
                httpx.post, f"{url}/v1/benchmark", params={"iterations": 1, **SMALL}, timeout=30
            )
            poll(engine.running.is_set, what="the first benchmark to run")
            second = httpx.post(f"{url}/v1/benchmark", params={"iterations": 1, **SMALL}, timeout=5)
            reserved = state.admission.pixels.used
        finally:
            engine.release(2)
        assert first.result().status_code == 200
        poll(lambda: state.admission.pixels.used == 0, what="the benchmark's pixels to be given back")
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "benchmark_busy" and int(second.headers["retry-after"]) >= 1
    assert reserved == 64 * 48  # the running benchmark's pixels count against MAX_PIXELS_IN_FLIGHT


def test_a_benchmark_does_not_start_while_detections_are_served():
    """A benchmark taking the engine between requests would keep them waiting for a whole run each time:
    it waits for an idle service (429 until then)."""
    loader = gated_loader(max_batch=1)
    app = create_app(settings(enable_benchmark=True), loader=loader)
    engine = loader.backend
    with serving(app) as (url, _), ThreadPoolExecutor(1) as pool:
        try:
            served = pool.submit(detect, url, 30)
            poll(engine.running.is_set, what="the detection to run")
            refused = httpx.post(f"{url}/v1/benchmark", params={"iterations": 1, **SMALL}, timeout=5)
        finally:
            engine.release(2)
        assert served.result().status_code == 200
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "benchmark_busy" and refused.headers["retry-after"] == "1"


def test_an_abandoned_benchmark_stops_and_gives_the_engine_back():
    """Issue #25: a benchmark whose client had gone kept the engine (no /detect answered for 153 s)."""
    loader = standin_loader(delay_s=0.02)
    app = create_app(endless_settings(benchmark_max_s=600), loader=loader)
    engine = loader.backend
    with serving(app) as (url, _):
        sock = connect(url)
        query = "&".join(f"{k}={v}" for k, v in ENDLESS.items())
        sock.sendall(f"POST /v1/benchmark?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        poll(lambda: len(engine.calls) >= 3, what="the benchmark to run")
        sock.close()
        first = detect(url)  # answered once the benchmark has stopped and given the engine back
        calls = len(engine.calls)
        second = detect(url)
        assert len(engine.calls) == calls + 1  # nothing else runs on the engine any more
    assert (first.status_code, second.status_code) == (200, 200), first.text


def test_a_benchmark_ends_when_the_server_drains():
    loader = standin_loader(delay_s=0.02)
    app = create_app(endless_settings(benchmark_max_s=600, graceful_timeout_s=20), loader=loader)
    engine = loader.backend
    with serving(app) as (url, server), ThreadPoolExecutor(1) as pool:
        running_one = pool.submit(httpx.post, f"{url}/v1/benchmark", params=ENDLESS, timeout=60)
        poll(lambda: len(engine.calls) >= 3, what="the benchmark to run")
        start = time.monotonic()
        server.should_exit = True  # what SIGTERM does
        r = running_one.result()
        took = time.monotonic() - start
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert took < 10  # not the graceful timeout (20 s)


def test_a_benchmark_longer_than_the_stall_limit_is_not_a_stall():
    """Readiness must not flap during a (bounded) benchmark: each iteration is progress."""
    loader = standin_loader(delay_s=0.02)
    app = create_app(endless_settings(benchmark_max_s=3, engine_stall_s=1.0), loader=loader)
    with serving(app) as (url, _), ThreadPoolExecutor(1) as pool:
        bench = pool.submit(httpx.post, f"{url}/v1/benchmark", params=ENDLESS, timeout=30)
        poll(lambda: len(loader.backend.calls) >= 1, what="the benchmark to run")
        statuses = []
        while not bench.done():
            statuses.append(httpx.get(f"{url}/readyz", timeout=10).status_code)
    assert bench.result().json()["stopped"] == "time_limit"
    assert len(statuses) > 3 and set(statuses) == {200}


def test_run_benchmark_stops_between_iterations_and_reports_progress():
    backend = StandInBackend()
    backend.load()
    detector = BatchDetector(backend)
    data = synthetic_jpeg(64, 48)
    stop = threading.Event()
    seen: list[int] = []

    def on_iteration() -> None:
        seen.append(1)
        if len(seen) == 3:
            stop.set()

    run = run_benchmark(detector, data, 100, 1, 1, 10_000, 8, stop=stop, on_iteration=on_iteration)
    assert (run.iterations, run.stopped, len(seen)) == (2, "stopped", 3)  # 1 warm-up + 2 timed
    spent = run_benchmark(detector, data, 100, 1, 5, 10_000, 8, budget_s=0.0)
    assert (spent.iterations, spent.stopped) == (1, "time_limit")  # at least one timed iteration
    assert (spent.width, spent.height) == (64, 48) and set(spent.latency_ms) >= {"total", "inference"}
