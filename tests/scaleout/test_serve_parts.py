"""The Ray Serve parts that need no Ray: the ingress's retry rules, a replica's in-process ASGI call and the
ASGI app a `--direct` replica hands Serve."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from scaleout.serve import Answer, Forwarded, Ingress, ServedApp, call_asgi
from service.errors import overloaded

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from service_testing import encode, noise_image, running, settings, standin_loader

REQUEST = Forwarded("POST", "/detect", b"", [(b"content-type", b"image/jpeg")], b"...")
OK = Answer(200, [(b"content-type", b"application/json")], b"{}")


class ActorDiedError(Exception):
    """Named as Ray's: the ingress matches Ray's errors by class name."""


class FakeHandle:
    """Answers from a script: an exception instance is raised, an Answer returned."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls = 0

    async def remote(self, request: Forwarded) -> Answer:
        self.calls += 1
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return Answer(outcome.status, list(outcome.headers), outcome.body)


def test_a_dead_replica_is_retried_on_another():
    handle = FakeHandle(ActorDiedError("replica died"), OK)
    answer = asyncio.run(Ingress(handle).forward(REQUEST))
    assert answer.status == 200 and (b"x-attempts", b"2") in answer.headers and handle.calls == 2


def test_no_replica_left_is_a_json_503():
    handle = FakeHandle(*[ActorDiedError("died")] * 3)
    answer = asyncio.run(Ingress(handle, attempts=3).forward(REQUEST))
    body = json.loads(answer.body)
    assert answer.status == 503 and body["error"]["code"] == "unavailable" and handle.calls == 3
    assert (b"retry-after", b"1") in answer.headers


class BackPressureError(Exception):
    """Named as Ray Serve's: every replica's queue is full."""


def test_full_replicas_are_a_json_503_overloaded_as_the_service_answers():
    handle = FakeHandle(BackPressureError("full"))
    answer = asyncio.run(Ingress(handle).forward(REQUEST))
    want = overloaded("every replica is at capacity")
    assert (answer.status, answer.body) == (503, want.body()) and handle.calls == 1
    assert answer.headers == want.response_headers()
    assert json.loads(answer.body)["error"]["message"] == "every replica is at capacity; retry shortly"


def test_a_bug_is_not_retried():
    handle = FakeHandle(ValueError("bug"), OK)
    with pytest.raises(ValueError):
        asyncio.run(Ingress(handle).forward(REQUEST))
    assert handle.calls == 1


def test_a_replica_answers_as_the_service_does():
    """``call_asgi`` (what a replica runs) gives the same status, body and headers as HTTP to the app."""
    from service.app import create_app

    image = encode(noise_image(64, 48, seed=3))
    app = create_app(settings(), loader=standin_loader())
    with running(app) as client:  # also runs the app's lifespan (model loaded, batcher started)
        for data, ctype in ((image, "image/jpeg"), (b"GIF89a", "image/gif"), (b"", "image/jpeg")):
            want = client.post("/detect", content=data, headers={"content-type": ctype})
            request = Forwarded(
                "POST", "/detect", b"score_threshold=0.5", [(b"content-type", ctype.encode())], data
            )
            got = client.portal.call(call_asgi, app, request, b"node/replica")
            assert got.status == want.status_code
            got_body, want_body = json.loads(got.body), want.json()
            if want.status_code == 200:
                assert got_body["detections"] == want_body["detections"]
            else:
                assert got_body == want_body
            assert (b"x-served-by", b"node/replica") in got.headers


def test_a_direct_replica_is_the_service_app_tagged_with_the_replica():
    """``ServedApp`` (what Serve drives in a ``--direct`` replica): the app's own answers, plus ``X-Served-By``;
    Serve's lifespan events are acknowledged without starting the app a second time."""
    from service.app import create_app

    image = encode(noise_image(64, 48, seed=3))
    app = create_app(settings(), loader=standin_loader())
    served = ServedApp(app, b"node/replica")
    with running(app) as client:
        for data, ctype in ((image, "image/jpeg"), (b"GIF89a", "image/gif")):
            want = client.post("/detect?score_threshold=0.5", content=data, headers={"content-type": ctype})
            request = Forwarded(
                "POST", "/detect", b"score_threshold=0.5", [(b"content-type", ctype.encode())], data
            )
            got = client.portal.call(drive, served, request)
            assert got.status == want.status_code
            assert (b"x-served-by", b"node/replica") in got.headers
            assert b"x-request-id" in dict(want.headers.raw)  # the app's, which Serve's server sends instead
            assert b"x-request-id" not in dict(got.headers)
            got_body, want_body = json.loads(got.body), want.json()
            if want.status_code == 200:
                assert got_body["detections"] == want_body["detections"]
            else:
                assert got_body == want_body
        lifespan_sent = client.portal.call(run_lifespan, served)
        assert lifespan_sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert app.state.service.status == "ready"  # Serve's lifespan did not touch the replica's app


async def drive(app, request: Forwarded) -> Answer:
    """``request`` through the ASGI app ``app`` as Serve's proxy drives an ingress replica."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": request.body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query_string, "root_path": "", "headers": request.headers,
             "client": ("127.0.0.1", 1), "server": ("replica", 0)}  # fmt: skip
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], list(start.get("headers", [])), body)


async def run_lifespan(app) -> list[str]:
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict:
        return events.pop(0)

    async def send(message: dict) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


def test_the_ingress_is_chosen_in_one_place(monkeypatch):
    """``auto`` is HAProxy where Ray Serve finds one, else Serve's Python proxy; each ingress is one set of settings for Serve's controller, which passes them to every proxy and replica."""
    import scaleout.ingress as ray_serve

    monkeypatch.setattr(ray_serve, "haproxy_installed", lambda: True)
    assert ray_serve.choose_ingress() == "haproxy"
    monkeypatch.setattr(ray_serve, "haproxy_installed", lambda: False)
    assert ray_serve.choose_ingress("auto") == "serve-proxy"
    assert ray_serve.choose_ingress("haproxy") == "haproxy"  # asked for: Serve reports a missing binary
    with pytest.raises(ValueError, match="ingress must be one of"):
        ray_serve.choose_ingress("nginx")
    assert ray_serve.INGRESS_ENV["haproxy"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert ray_serve.INGRESS_ENV["serve-proxy"]["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
