"""Operations endpoints through HTTP: health/readiness (also before the model is ready), model metadata,
KServe v2 routes, Prometheus metrics, OpenAPI docs, the benchmark endpoint, API key and CORS."""

from __future__ import annotations

import threading
import time

import pytest
from service_testing import StandInBackend, app_for, encode, noise_image, running, settings, standin_loader

from model.checkpoint import file_sha256
from service.app import create_app

IMAGE = encode(noise_image(64, 48, seed=3))


def test_health_and_readiness_routes(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json() == {"status": "ready", "detail": None}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "refinedet"


def test_model_metadata(client, tiny_checkpoint):
    info = client.get("/v1/model").json()
    assert info["classes"] == ["a", "b"] and info["input_size"] == 64
    assert (info["backend"], info["device"], info["precision"]) == ("torch", "cpu", "fp32")
    assert info["artifact_sha256"] == file_sha256(tiny_checkpoint) and info["trained"] is True
    assert info["max_batch_size"] == 4 and info["artifact"] == tiny_checkpoint.name  # never the path
    assert str(tiny_checkpoint.parent) not in client.get("/v1/model").text
    v2 = client.get(f"/v2/models/{info['name']}").json()
    assert v2["platform"] == "pytorch_eager"  # an eager checkpoint, not TorchScript
    assert v2["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in v2["outputs"]] == [
        ("boxes", "FP32"),
        ("scores", "FP32"),
        ("labels", "INT32"),
        ("count", "INT32"),
    ]
    assert v2["outputs"][0]["shape"] == [-1, -1, 4] and v2["parameters"]["class_names"] == "a,b"
    assert client.get(f"/v2/models/{info['name']}/ready").json()["ready"] is True
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "no model named" in missing.json()["error"]  # the OIP's shape


def test_metrics_count_requests_stages_and_batches(client):
    assert client.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"}).status_code == 200
    client.get("/nope")
    text = client.get("/metrics").text
    assert 'refinedet_http_requests_total{method="POST",route="/detect",status="200"}' in text
    assert 'refinedet_http_requests_total{method="GET",route="unmatched",status="404"}' in text
    for stage in ("decode", "preprocess", "queue", "inference", "postprocess", "total"):
        assert f'refinedet_stage_duration_seconds_count{{stage="{stage}"}}' in text
    for name in (
        "refinedet_batch_size_count",
        "refinedet_queue_depth",
        "refinedet_http_requests_in_flight",
        "refinedet_ready 1.0",
    ):
        assert name in text
    assert (
        'refinedet_model_info{backend="torch",device="cpu",name="refinedet320_vgg16",precision="fp32"} 1.0'
        in text
    )


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/detect",
        "/detect/batch",
        "/healthz",
        "/readyz",
        "/v1/model",
        "/v1/benchmark",
        "/metrics",
    } <= paths
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/{name}"} <= paths
    body = schema["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(body)
    assert "swagger" in client.get("/docs").text.lower()


def test_the_schema_is_built_at_startup_not_on_a_request():
    """Labelling a request answered before routing needs the route templates, from the OpenAPI schema:
    built at startup, so no request pays for it on the event loop (a 0.1-0.2 s stall of every connection)."""
    app = create_app(settings(), loader=standin_loader())
    assert app.openapi_schema is None
    with running(app):
        assert app.openapi_schema is not None


def test_docs_page_loads_nothing_from_outside(client):
    """Swagger UI comes from the fastapi-offline package's files: the page works offline (that it renders the
    schema is tests/service/test_browser.py's)."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # every asset from this server
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in urls
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 10_000
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page would need a CDN


def test_not_ready_until_loaded_then_ready():
    release = threading.Event()
    backend = StandInBackend()
    backend.load()

    def slow_loader(_settings):
        assert release.wait(30)
        return backend

    from fastapi.testclient import TestClient

    app = create_app(settings(), loader=slow_loader)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["status"] == "loading"
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"})
        assert (
            r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        )
        assert c.get("/v1/model").status_code == 503
        release.set()
        from service_testing import wait_ready

        wait_ready(c.get)
        assert c.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"}).status_code == 200
    assert (
        app.state.service.admission.admitted == 0
    )  # refusals while loading released what they were counted as


def test_failed_load_is_reported_not_ready_without_internals(caplog):
    secret = "/srv/secret/models/x.pth: weights do not fit"

    def broken(_settings):
        raise ValueError(secret)

    from fastapi.testclient import TestClient

    with TestClient(create_app(settings(), loader=broken)) as c:
        deadline = time.monotonic() + 30
        while c.get("/healthz").status_code != 503 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        answers = [
            c.get("/healthz"),
            c.get("/readyz"),
            c.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"}),
            c.get("/v1/model"),
        ]
    assert [a.status_code for a in answers] == [503, 503, 503, 503]
    assert answers[1].json()["status"] == "failed"
    assert answers[2].json()["error"]["code"] == "not_ready"
    for answer in answers:
        assert "/srv" not in answer.text and "weights do not fit" not in answer.text, answer.text
    assert "retry-after" not in answers[2].headers  # a failed load does not heal by retrying
    assert secret in caplog.text  # the operator still learns why


def test_benchmark_is_disabled_by_default(client):
    r = client.post("/v1/benchmark")
    assert r.status_code == 403 and r.json()["error"]["code"] == "benchmark_disabled"


def test_benchmark_reports_percentiles_per_stage():
    app = create_app(settings(enable_benchmark=True, benchmark_max_iterations=20), loader=standin_loader())
    with running(app) as c:
        r = c.post(
            "/v1/benchmark",
            params={"iterations": 5, "batch_size": 2, "warmup": 1, "width": 100, "height": 80},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["iterations"] == 5 and body["batch_size"] == 2 and body["synthetic_image"] is True
        assert body["image"] == {"width": 100, "height": 80} and body["throughput_images_per_s"] > 0
        assert set(body["latency_ms"]) == {"decode", "preprocess", "inference", "postprocess", "total"}
        for stats in body["latency_ms"].values():
            assert set(stats) == {"p50", "p90", "p99", "mean"} and 0 <= stats["p50"] <= stats["p99"]
        posted = c.post(
            "/v1/benchmark", params={"iterations": 2}, files={"file": ("x.jpg", IMAGE, "image/jpeg")}
        )
        assert (
            posted.json()["image"] == {"width": 64, "height": 48}
            and posted.json()["synthetic_image"] is False
        )
        assert c.post("/v1/benchmark", params={"iterations": 21}).status_code == 422


def test_api_key_guards_detection_and_model_but_not_health():
    app = create_app(settings(api_key="s3cret"), loader=standin_loader())
    with running(app) as c:
        send = {"content": IMAGE, "headers": {"content-type": "image/jpeg"}}
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = c.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg", **headers})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert c.get("/v1/model", headers=headers).status_code == 401
        ok = c.post("/detect", content=send["content"], headers={**send["headers"], "X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        # with a key configured, the benchmark is available to key holders only
        assert c.post("/v1/benchmark", params={"iterations": 1}).status_code == 401
        assert (
            c.post("/v1/benchmark", params={"iterations": 1}, headers={"X-API-Key": "s3cret"}).status_code
            == 200
        )


@pytest.mark.parametrize("origins", [[], ["https://viewer.example"]])
def test_cors_is_off_unless_configured(origins):
    app = create_app(settings(cors_origins=origins), loader=standin_loader())
    with running(app) as c:
        r = c.get("/healthz", headers={"Origin": "https://viewer.example"})
        assert ("access-control-allow-origin" in r.headers) == bool(origins)


def test_untrained_default_model_is_served_and_labelled(monkeypatch):
    """No --model and no shipped checkpoint: an untrained RefineDet320 with the BCCD classes, said so."""
    import model.zoo

    monkeypatch.setattr(model.zoo, "default_checkpoint", lambda: None)
    with running(app_for(settings(model=None))) as c:
        info = c.get("/v1/model").json()
    assert info["trained"] is False and "untrained" in info["weights"]
    assert (
        info["classes"] == ["Platelets", "RBC", "WBC"] and info["input_size"] == 320
    )  # the shipped model's order
    assert info["artifact"] is None and info["artifact_sha256"] is None


def test_access_log_is_structured_with_the_request_id(caplog):
    import json
    import logging

    from model.logs import JsonFormatter

    with (
        running(create_app(settings(access_log=True), loader=standin_loader())) as c,
        caplog.at_level(logging.INFO, "refinedet.access"),
    ):
        c.get("/healthz", headers={"X-Request-ID": "trace-7"})
    [record] = [
        r for r in caplog.records if r.name == "refinedet.access" and r.fields["request_id"] == "trace-7"
    ]
    line = json.loads(JsonFormatter().format(record))
    assert (line["path"], line["status"], line["method"], line["event"]) == ("/healthz", 200, "GET", "access")
    assert line["request_id"] == "trace-7" and line["duration_ms"] >= 0 and line["level"] == "info"


@pytest.mark.slow
def test_shipped_default_model_is_served_and_trained():
    """The trained default (xz-compressed, about 10 s to decompress and load on 2 cores)."""
    from model.zoo import default_checkpoint

    if default_checkpoint() is None:
        pytest.skip("no default checkpoint in this checkout")
    with running(app_for(settings(model=None))) as c:
        info = c.get("/v1/model").json()
    assert info["trained"] is True and info["artifact"] == str(default_checkpoint())
    assert sorted(info["classes"]) == ["Platelets", "RBC", "WBC"] and info["input_size"] == 320
    assert info["artifact_sha256"] == file_sha256(default_checkpoint())


def test_concurrent_benchmarks_finish_and_detect_still_answers():
    """Issue #25: three concurrent POST /v1/benchmark with two engine slots deadlocked the engine (two never
    answered, every /detect then waited for its timeout). Each is now answered: one runs, and those that
    arrive while it runs are refused at once (429)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from service_testing import serving

    app = create_app(
        settings(enable_benchmark=True, cpu_streams=2, request_timeout_s=20), loader=standin_loader()
    )
    with serving(app) as (url, _), ThreadPoolExecutor(3) as pool:
        params = {"iterations": 3, "warmup": 0}
        calls = [pool.submit(httpx.post, f"{url}/v1/benchmark", params=params, timeout=30) for _ in range(3)]
        statuses = [c.result().status_code for c in calls]
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        r = httpx.post(f"{url}/detect", content=IMAGE, headers={"content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text


def test_readyz_reports_an_engine_that_makes_no_progress():
    """Issue #25: readiness said 200 while the engine was stuck. With work waiting and none finished for
    ENGINE_STALL_S, /readyz (and /v2/health/ready) answer 503 stalled, and 200 again once it moves."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from service_testing import gated_loader, poll, serving

    loader = gated_loader(max_batch=1)
    engine = loader.backend
    app = create_app(settings(engine_stall_s=0.3), loader=loader)
    with serving(app) as (url, _), ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=10) as c:
        try:
            hung = pool.submit(httpx.post, f"{url}/detect", content=IMAGE, headers={"content-type": "image/jpeg"},
                               timeout=30)  # fmt: skip
            poll(engine.running.is_set, what="the engine to take the request")
            poll(lambda: c.get("/readyz").status_code == 503, what="/readyz to report the stall")
            stalled, v2, metrics = c.get("/readyz"), c.get("/v2/health/ready"), c.get("/metrics").text
        finally:
            engine.release(1)
        assert hung.result().status_code == 200
        poll(lambda: c.get("/readyz").status_code == 200, what="/readyz to recover")
    assert stalled.json()["status"] == "stalled" and "no progress" in stalled.json()["detail"]
    assert v2.status_code == 503 and v2.json() == {"ready": False}
    [gauge] = [
        ln for ln in metrics.splitlines() if ln.startswith("refinedet_engine_seconds_without_progress ")
    ]
    assert float(gauge.split()[1]) > 0.3
