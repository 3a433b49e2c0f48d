"""The closed-loop load generator against a small local aiohttp server: it counts answers, latencies,
detections and errors, and refuses any host but this machine."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench.load_gen import check_loopback, combine, run_level, split


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    """POST /detect: 200 with two detections for b"ok", 500 for anything else."""

    async def detect(request: web.Request) -> web.Response:
        body = await request.read()
        if body == b"slow":
            await asyncio.sleep(0.5)
            body = b"ok"
        if body == b"ok":
            return web.json_response({"detections": [{"score": 0.9}, {"score": 0.8}]})
        return web.json_response({"error": "bad"}, status=500)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/detect", detect)
    runner = web.AppRunner(app)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}/detect"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_only_loopback_hosts_are_accepted():
    assert check_loopback("http://127.0.0.1:8000/detect")
    with pytest.raises(ValueError, match="only targets this machine"):
        check_loopback("http://example.com/detect")
    with pytest.raises(ValueError):
        run_level("http://10.0.0.1:80/detect", [b"ok"], 1, 0.1, 0.0)


def test_split_spreads_workers_evenly():
    assert split(64, 4) == [16, 16, 16, 16]
    assert split(5, 2) == [3, 2]
    assert split(3, 8) == [1, 1, 1]
    assert split(1, 1) == [1]


def test_a_level_counts_answers_latencies_and_errors(echo_server):
    result = run_level(echo_server, [b"ok", b"ok", b"bad"], concurrency=3, duration_s=0.6, warmup_s=0.1)
    assert result["concurrency"] == 3 and result["ok"] > 10
    assert result["errors"] > 0 and set(result["error_kinds"]) == {"HTTP 500"}
    assert result["detections_per_response"] == 2.0
    assert result["requests_per_s"] > 0 and 0.5 < result["elapsed_s"] < 5
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]


def test_answers_are_counted_when_they_arrive_in_the_window(echo_server):
    """A request started in the window but answered after it is not counted (nor, the other way round,
    one answered in the window but started in the warm-up), and the rate is over the window's length."""
    late = run_level(echo_server, [b"slow"], concurrency=1, duration_s=0.3, warmup_s=0.0)
    assert (late["ok"], late["elapsed_s"]) == (0, 0.3)
    early = run_level(echo_server, [b"slow"], concurrency=2, duration_s=0.6, warmup_s=0.2)
    assert early["ok"] == 2 and early["requests_per_s"] == round(2 / 0.6, 2)  # answered at ~0.5 s


def test_connection_errors_are_counted_not_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    result = run_level(f"http://127.0.0.1:{port}/detect", [b"ok"], 1, duration_s=0.2, warmup_s=0.0)
    assert result["ok"] == 0 and result["errors"] > 0 and result["latency_ms"]["p50"] is None


def test_combine_merges_processes():
    parts = [
        {"latencies_ms": [1.0, 2.0], "errors": {"HTTP 503": 1}, "detections": 4, "elapsed_s": 1.0},
        {"latencies_ms": [3.0], "errors": {"HTTP 503": 2}, "detections": 2, "elapsed_s": 1.5},
    ]
    result = combine(4, parts)
    assert result["ok"] == 3 and result["errors"] == 3 and result["error_kinds"] == {"HTTP 503": 3}
    assert result["requests_per_s"] == 2.0 and result["detections_per_response"] == 2.0


@pytest.mark.slow
def test_several_client_processes(echo_server):
    result = run_level(echo_server, [b"ok"], concurrency=4, duration_s=0.5, warmup_s=0.1, processes=2)
    assert result["ok"] > 10 and result["errors"] == 0


def test_rounds_pool_latencies_and_add_up_their_time():
    from bench.load_gen import combine_rounds

    def level(latencies, elapsed):
        parts = [
            {"latencies_ms": latencies, "errors": {}, "detections": len(latencies), "elapsed_s": elapsed}
        ]
        return {"concurrency": 2, "parts": parts}

    out = combine_rounds([level([10.0, 20.0], 2.0), level([30.0, 40.0, 50.0, 60.0], 2.0)])
    assert out["ok"] == 6 and out["elapsed_s"] == 4.0 and out["requests_per_s"] == 1.5
    assert out["rounds"] == 2 and out["latency_ms"]["p50"] is not None and out["concurrency"] == 2
