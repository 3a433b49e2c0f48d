"""What every inference request is held to (service/admission.py), under a real uvicorn server: a request
that cannot be served in time is answered 503 + Retry-After at once (before its body is read), decoded
pixels in flight stay within their budget, and a shutdown answers every request it cannot serve with a
JSON 503 ``shutting_down``, never a bare 500. The engine is a stand-in that runs a batch only when the
test lets it, so nothing here synchronises by sleeping."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image
from service_testing import (
    connect,
    encode,
    gated_loader,
    noise_image,
    poll,
    read_response,
    serving,
    settings,
    standin_loader,
)
from test_server import metric_samples

from model.logs import log_config
from service.admission import PIXELS_KEY, Admission
from service.app import create_app

IMAGE = encode(noise_image(64, 48, seed=11))
JPEG = {"content": IMAGE, "headers": {"content-type": "image/jpeg"}}


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/detect", timeout=60, **{**JPEG, **kwargs})


def queue_depth(url: str) -> float:
    return metric_samples(httpx.get(f"{url}/metrics").text)["refinedet_queue_depth", ()]


def test_requests_that_cannot_be_served_in_time_are_refused_at_once():
    loader = gated_loader(max_batch=1, delay_s=1.0)
    app = create_app(
        settings(max_batch_size=1, max_delay_ms=0, request_timeout_s=60.0, admission_headroom=0.1),
        loader=loader,
    )
    engine, state = loader.backend, app.state.service
    with serving(app) as (url, _):
        engine.release()  # one batch of ~1 s: the recent batch time
        assert post(url).status_code == 200
        pool = ThreadPoolExecutor(12)
        first = pool.submit(post, url)
        poll(engine.running.is_set, what="the engine to hold a batch")
        rest = [pool.submit(post, url) for _ in range(11)]
        # While the engine holds its batch, what cannot fit in 0.1 x 60 s (~5 batches) is refused at once.
        poll(lambda: sum(f.done() for f in rest) >= 6, what="the refusals")
        poll(
            lambda: sum(f.done() for f in rest) + state.admission.admitted == 12, what="every request decided"
        )
        refused = [f.result() for f in rest if f.done()]
        # A client that waits for a go-ahead (Expect: 100-continue) is refused from its headers alone.
        raw = connect(url)
        raw.sendall(
            b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 99999\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        raw_status, raw_headers, raw_body = read_response(raw)
        assert not first.done() and engine.running.is_set()  # all of that while the engine was busy
        engine.release(12)
        served = [first.result()] + [f.result() for f in rest if f.result() not in refused]
    assert {(r.status_code, r.json()["error"]["code"]) for r in refused} == {(503, "overloaded")}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert (raw_status, raw_body["error"]["code"]) == (503, "overloaded") and "retry-after" in raw_headers
    assert 1 <= len(served) <= 6 and {r.status_code for r in served} == {200}, [r.text for r in served]
    assert state.admission.admitted == 0


def test_decoded_pixels_in_flight_stay_within_the_budget():
    big = io.BytesIO()
    Image.new("RGB", (1000, 1000), (200, 30, 30)).save(big, format="PNG")  # tiny file, 1 M pixels
    loader = gated_loader(max_batch=1)
    app = create_app(
        settings(max_batch_size=1, max_delay_ms=0, max_pixels_in_flight=2_000_000), loader=loader
    )
    engine, state = loader.backend, app.state.service
    send = {"content": big.getvalue(), "headers": {"content-type": "image/png"}}
    with serving(app) as (url, _):
        pool = ThreadPoolExecutor(3)
        held = [pool.submit(post, url, **send) for _ in range(2)]
        poll(lambda: engine.running.is_set() and queue_depth(url) == 1, what="two decoded images held")
        third = post(url, **send)
        assert third.status_code == 503 and state.admission.pixels.used == 2_000_000  # the third took none
        engine.release(2)
        answers = [f.result() for f in held]
        poll(lambda: state.admission.pixels.used == 0, what="the budget to be released")
    assert (third.status_code, third.json()["error"]["code"]) == (503, "overloaded")
    assert "retry-after" in third.headers
    assert [a.status_code for a in answers] == [200, 200]


def test_shutdown_answers_every_request_it_cannot_serve_with_json_503():
    """The issue's case: requests that would wait past the drain (request timeout 120 s, longer than the
    graceful timeout) are answered 503 shutting_down when it ends, never a bare 500; one that the engine
    serves during the drain gets its result."""
    loader = gated_loader(max_batch=1)
    app = create_app(
        settings(max_batch_size=1, max_delay_ms=0, request_timeout_s=120, graceful_timeout_s=2.0),
        loader=loader,
    )
    engine, state = loader.backend, app.state.service
    with serving(app) as (url, server):
        pool = ThreadPoolExecutor(4)
        pending = [pool.submit(post, url) for _ in range(4)]
        poll(lambda: engine.running.is_set() and queue_depth(url) == 3, what="1 running + 3 queued")
        server.should_exit = True  # what SIGTERM does
        engine.release(1)  # the running batch finishes; the next one waits past the drain's end
        answers = [p.result() for p in pending]
        poll(lambda: not state.batcher.depth, what="the queue to empty")
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200, 503, 503, 503], [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "shutting_down"
            assert answer.headers["content-type"] == "application/json"
    assert engine.calls == [1]  # the cancelled requests never reached the engine


def test_a_413_from_content_length_counts_under_its_route():
    app = create_app(settings(max_upload_bytes=1024), loader=standin_loader())
    with serving(app) as (url, _):
        r = httpx.post(f"{url}/detect", content=b"x" * 4096, headers={"content-type": "image/jpeg"})
        metrics = metric_samples(httpx.get(f"{url}/metrics").text)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    key = ("refinedet_http_requests_total", (("method", "POST"), ("route", "/detect"), ("status", "413")))
    assert metrics.get(key) == 1


def test_library_log_lines_are_json(capsys):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(log_config("info"))
        logging.getLogger("python_multipart.multipart").warning("Skipping data after last boundary")
        logging.getLogger("asyncio").error("Future exception was never retrieved")
    finally:
        root.handlers[:], root.level = saved
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2
    assert [json.loads(line)["logger"] for line in lines] == ["python_multipart.multipart", "asyncio"]


def test_every_inference_route_is_guarded():
    """The OIP route (/v2/models/{name}/infer) gets the same admission and pixel budget as /detect,
    without doing anything for it: the guard and the budget sit under every route."""
    import base64

    big = io.BytesIO()
    Image.new("RGB", (1000, 1000), (20, 90, 30)).save(big, format="PNG")
    infer = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1, 1],
                "data": [[base64.b64encode(big.getvalue()).decode()]],
            }
        ]
    }
    loader = gated_loader(max_batch=1)
    app = create_app(
        settings(max_batch_size=1, max_delay_ms=0, max_queue_size=2, max_pixels_in_flight=1_500_000),
        loader=loader,
    )
    engine = loader.backend
    with serving(app) as (url, _):
        pool = ThreadPoolExecutor(2)
        held = pool.submit(httpx.post, f"{url}/v2/models/standin/infer", json=infer, timeout=60)
        poll(engine.running.is_set, what="the OIP request to hold the engine and 1 M pixels")
        over_budget = httpx.post(f"{url}/v2/models/standin/infer", json=infer, timeout=60)
        blocker = pool.submit(post, url)  # admitted: 2 of max_queue_size 2
        poll(lambda: queue_depth(url) == 1, what="a second request queued")
        refused = httpx.post(f"{url}/v2/models/standin/infer", json=infer, timeout=60)
        engine.release(2)
        assert held.result().status_code == 200 and blocker.result().status_code == 200
    assert over_budget.status_code == 503 and "retry-after" in over_budget.headers
    # In the protocol's shape (service.errors.error_body), as every answer under /v2.
    assert refused.status_code == 503 and "retry shortly" in refused.json()["error"]


def test_a_refused_upload_still_being_sent_gets_its_answer():
    """A refusal is answered after the body is read and dropped, so a client still sending (and asking
    to close) reads its 503, rather than a reset connection."""
    loader = gated_loader(max_batch=1)
    app = create_app(settings(max_batch_size=1, max_delay_ms=0, max_queue_size=1), loader=loader)
    engine, state = loader.backend, app.state.service
    body = b"\xff" * (4 * 1024 * 1024)
    with serving(app) as (url, _):
        held = ThreadPoolExecutor(1).submit(post, url)
        poll(engine.running.is_set, what="a request to hold the only place")
        sock = connect(url)
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        for start in range(0, len(body), 256 * 1024):  # the server decides before this is all sent
            sock.sendall(body[start : start + 256 * 1024])
        status, _, answer = read_response(sock)
        engine.release()
        assert held.result().status_code == 200
    assert (status, answer["error"]["code"]) == (503, "overloaded")
    assert state.admission.admitted == 0


# --- Admission on its own (no server) ---------------------------------------------------------------


class WaitEstimate:
    """Stands in for the batcher: ``expected_wait_s(ahead)`` is ``ahead + 1`` batch times of ``batch_s``."""

    def __init__(self, batch_s: float) -> None:
        self.batch_s = batch_s

    def expected_wait_s(self, ahead: int) -> float:
        return (ahead + 1) * self.batch_s


class Drops:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def on_drop(self, reason: str) -> None:
        self.reasons.append(reason)


def inference_scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    return {"type": "http", "method": "POST", "path": "/detect", "headers": headers or []}


def test_admission_counts_what_it_admits_and_refuses_what_cannot_wait():
    drops = Drops()
    admission = Admission(settings(request_timeout_s=10.0, admission_headroom=0.5, max_queue_size=100), drops)
    admission.batcher = WaitEstimate(batch_s=1.6)  # type: ignore[assignment]
    scopes = [inference_scope() for _ in range(4)]
    refusals = [admission.admit(scope) for scope in scopes]
    # Allowed: 0.5 x 10 s. Waits of 1.6, 3.2 and 4.8 s fit; the fourth (6.4 s) is refused, with a
    # Retry-After of what it is over by, rounded up.
    assert refusals[:3] == [None] * 3 and admission.admitted == 3
    refused = refusals[3]
    assert refused is not None and (refused.status, refused.code) == (503, "overloaded")
    assert refused.headers == {"Retry-After": "2"} and drops.reasons == ["admission"]
    assert admission.admit(scopes[3]) is None  # decided once per request
    admission.pixels.reserve(100, scopes[0]["state"].setdefault(PIXELS_KEY, []))
    for scope in scopes:
        admission.release(scope["state"])
    assert admission.admitted == 0 and admission.pixels.used == 0
    exempt = {"type": "http", "method": "POST", "path": "/v1/benchmark", "headers": []}
    assert admission.admit(exempt) is None and admission.admitted == 0


def test_admission_while_draining_and_while_not_serving():
    async def scenario() -> None:
        drops = Drops()
        admission = Admission(settings(request_timeout_s=60.0, graceful_timeout_s=0.5), drops)
        assert admission.admit(inference_scope()) is None and admission.admitted == 1  # loading: not_ready
        admission.batcher = WaitEstimate(batch_s=1.0)  # type: ignore[assignment]
        async with asyncio.timeout(None) as in_flight:
            admission.watch(in_flight)
            assert admission.begin_drain() and not admission.begin_drain()  # once
            assert in_flight.when() is not None  # capped at the drain's end
            admission.unwatch(in_flight)
        refused = admission.admit(inference_scope())  # 2 s of wait, 0.5 s of drain left
        assert refused is not None and refused.code == "shutting_down" and drops.reasons == ["draining"]
        admission.batcher = None  # shut down: nothing more is admitted past the drain
        refused = admission.admit(inference_scope())
        assert refused is not None and refused.code == "shutting_down" and admission.admitted == 1

    asyncio.run(scenario())


def test_requests_without_the_api_key_are_not_counted_against_key_holders():
    """Issue #25: with an API key set, anonymous requests (answered 401 by the route) were admitted first, so
    64 strangers filled the admission count and key holders got 503. They are not counted now."""
    drops = Drops()
    admission = Admission(
        settings(request_timeout_s=10.0, admission_headroom=0.5, max_queue_size=100, api_key="k3y"), drops
    )
    admission.batcher = WaitEstimate(batch_s=1.6)  # type: ignore[assignment]
    strangers = [inference_scope([(b"x-api-key", b"wrong")]) for _ in range(8)] + [inference_scope()]
    assert [admission.admit(s) for s in strangers] == [None] * 9 and admission.admitted == 0
    holders = [inference_scope([(b"x-api-key", b"k3y")]) for _ in range(3)]
    assert [admission.admit(s) for s in holders] == [None] * 3 and admission.admitted == 3
    assert drops.reasons == []
