"""POST /v2/models/{name}/infer (Open Inference Protocol v2): driven by ``tritonclient.http`` against a real
uvicorn, its detections equal /detect's for the same images; bad input gets a 4xx in the OIP error shape, on
a connection that stays open, hostile bodies included (issue #25); the body is parsed off the event loop."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from service_testing import app_for, connect, encode, noise_image, read_response, serving, settings
from test_oip import ISSUE_BODIES, flood_body

from service import oip

JPEG = encode(noise_image(96, 72, seed=1))
PNG = encode(noise_image(70, 100, seed=2), "PNG")
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    app = app_for(settings(model=tiny_checkpoint, max_batch_size=4, max_images_per_request=4))
    with serving(app) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        name = client.get("/v1/model").json()["name"]
        yield url, client, name


def detect(client: httpx.Client, data: bytes, **params) -> list[dict]:
    r = client.post("/detect", content=data, params={"score_threshold": THRESHOLD, **params},
                    headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["detections"]


def as_rows(boxes, scores, labels, count, i: int) -> list[tuple]:
    return [(int(labels[i, j]), float(scores[i, j]), *map(float, boxes[i, j])) for j in range(int(count[i]))]


def detect_rows(detections: list[dict]) -> list[tuple]:
    return [(d["class_id"], d["score"], *(d["box"][k] for k in ("x1", "y1", "x2", "y2"))) for d in detections]


def assert_same(rows: list[tuple], want: list[tuple]) -> None:
    """Same labels, scores within 1e-4, boxes within 0.02 px (/detect rounds to 0.01 px; a batch of two
    can land a box on the other side of a rounding boundary than a batch of one)."""
    assert len(rows) == len(want) and want, (len(rows), len(want))
    got, ref = np.array(rows), np.array(want)
    assert (got[:, 0] == ref[:, 0]).all()
    np.testing.assert_allclose(got[:, 1], ref[:, 1], atol=1e-4)
    np.testing.assert_allclose(got[:, 2:], ref[:, 2:], atol=0.02)


@pytest.mark.parametrize("binary_output", [True, False])
def test_tritonclient_gets_the_detections_of_detect(server, binary_output):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed (extra 'scale')")
    url, client, name = server
    triton = http.InferenceServerClient(url.removeprefix("http://"))
    assert triton.is_model_ready(name)
    metadata = triton.get_model_metadata(name)
    assert [o["name"] for o in metadata["outputs"]] == ["boxes", "scores", "labels", "count"]
    images = http.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([JPEG, PNG], dtype=np.object_))  # binary tensor extension
    outputs = [
        http.InferRequestedOutput(n, binary_data=binary_output)
        for n in ("boxes", "scores", "labels", "count")
    ]
    result = triton.infer(name, [images], outputs=outputs, parameters={"score_threshold": THRESHOLD})
    tensors = [result.as_numpy(n) for n in ("boxes", "scores", "labels", "count")]
    assert tensors[0].dtype == np.float32 and tensors[2].dtype == np.int32
    k = int(tensors[3].max())
    assert tensors[0].shape == (2, k, 4) and tensors[1].shape == (2, k)
    for i, data in enumerate((JPEG, PNG)):
        assert_same(as_rows(*tensors, i), detect_rows(detect(client, data)))
        assert (tensors[2][i, int(tensors[3][i]) :] == -1).all()  # padding


def test_json_request_with_base64_and_options(server):
    _, client, name = server
    body = {
        "id": "req-7",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1, 1],
                "data": [[base64.b64encode(JPEG).decode()]],
            }
        ],
        "parameters": {"score_threshold": THRESHOLD, "max_detections": 2, "classes": "b"},
    }
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-7" and out["model_name"] == name
    t = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in out["outputs"]}
    want = detect_rows(detect(client, JPEG, max_detections=2, classes="b"))
    assert_same(as_rows(t["boxes"], t["scores"], t["labels"], t["count"], 0), want)
    assert set(t["labels"].ravel().tolist()) == {1}  # class "b" is class_id 1, as in /detect


def infer_json(client, name, inputs, **extra):
    return client.post(f"/v2/models/{name}/infer", json={"inputs": inputs, **extra})


def image_input(*elements: str, datatype="BYTES", shape=None, input_name="image"):
    return [
        {"name": input_name, "datatype": datatype, "shape": shape or [len(elements)], "data": list(elements)}
    ]


B64 = base64.b64encode(JPEG).decode()


@pytest.mark.parametrize(
    ("inputs", "extra", "status", "says"),
    [
        (image_input(base64.b64encode(b"not an image").decode()), {}, 400, "not a decodable"),
        (image_input("%%%"), {}, 400, "base64"),
        (image_input(B64, input_name="images"), {}, 400, "unknown input 'images'"),
        (image_input(B64, datatype="FP32"), {}, 400, "must be BYTES"),
        (image_input(B64, shape=[2]), {}, 400, "shape [2] but 1 element"),
        (image_input(B64, B64, shape=[1, 2]), {}, 400, "one image per row"),
        (image_input(*[B64] * 5), {}, 413, "limit is 4"),
        (image_input(base64.b64encode(encode(noise_image(4, 40, 0))).decode()), {}, 422, "at least 8"),
        (image_input(base64.b64encode(b"GIF89a" + b"\0" * 30).decode()), {}, 415, "GIF"),
        (image_input(B64), {"outputs": [{"name": "masks"}]}, 400, "unknown output 'masks'"),
        (image_input(B64), {"parameters": {"score_threshold": 2}}, 422, "score_threshold"),
        (image_input(B64), {"parameters": {"max_detections": 0}}, 422, "max_detections"),
        (image_input(B64), {"parameters": {"classes": "zebra"}}, 422, "unknown class"),
        ([], {}, 400, "exactly one input"),
    ],
)
def test_bad_requests_get_oip_errors(server, inputs, extra, status, says):
    _, client, name = server
    r = infer_json(client, name, inputs, **extra)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and says in body["error"], body


def test_second_bad_image_is_named_and_malformed_bodies(server):
    _, client, name = server
    r = infer_json(client, name, image_input(B64, base64.b64encode(b"junk").decode()))
    assert r.status_code == 400 and r.json()["error"].startswith("file 1 (#1):")
    assert (
        client.post(f"/v2/models/{name}/infer", content=b"{nope").json()["error"].startswith("the inference")
    )
    r = client.post(
        f"/v2/models/{name}/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": "99"},
    )
    assert r.status_code == 400 and "does not fit" in r.json()["error"]
    r = infer_json(client, "other", image_input(B64))
    assert r.status_code == 404 and "no model named 'other'" in r.json()["error"]


def test_tritonclient_reads_the_error(server):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed (extra 'scale')")
    from tritonclient.utils import InferenceServerException

    url, _, name = server
    triton = http.InferenceServerClient(url.removeprefix("http://"))
    images = http.InferInput("image", [1], "BYTES")
    images.set_data_from_numpy(np.array([b"\xff\xd8 truncated"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not a decodable"):
        triton.infer(name, [images])


def test_api_key_error_in_oip_shape(tiny_checkpoint):
    from service_testing import running

    app = app_for(settings(model=tiny_checkpoint, api_key="k3y"))
    with running(app) as client:
        name = client.get("/v1/model", headers={"X-API-Key": "k3y"}).json()["name"]
        r = client.post(f"/v2/models/{name}/infer", json={"inputs": image_input(B64)})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        ok = client.post(
            f"/v2/models/{name}/infer", json={"inputs": image_input(B64)}, headers={"X-API-Key": "k3y"}
        )
        assert ok.status_code == 200 and [o["name"] for o in ok.json()["outputs"]][-1] == "count"


@pytest.mark.slow
def test_shipped_model_on_a_bccd_image_through_tritonclient():
    """The shipped BCCD model: tritonclient's answer equals /detect's on a real blood smear."""
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed (extra 'scale')")
    from model.zoo import default_checkpoint
    from tests.conftest import bccd_root

    root, checkpoint = bccd_root(), default_checkpoint()
    if root is None or checkpoint is None:
        pytest.skip("needs BCCD and the shipped checkpoint")
    data = (root / "JPEGImages" / "BloodImage_00000.jpg").read_bytes()
    with (
        serving(app_for(settings(model=checkpoint))) as (url, _),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        name = client.get("/v1/model").json()["name"]
        want = detect_rows(detect(client, data))
        triton = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        image = http.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([data], dtype=np.object_))
        result = triton.infer(name, [image], parameters={"score_threshold": THRESHOLD})
        tensors = [result.as_numpy(n) for n in ("boxes", "scores", "labels", "count")]
    assert len(want) >= 5  # a smear has many cells
    assert_same(as_rows(*tensors, 0), want)


def infer_then_healthz(url: str, name: str, body: bytes, headers: dict[str, str] | None = None):
    """POST ``body`` to the infer route, then GET /healthz on the same connection: (status, headers and
    JSON body of the first answer, status of the second)."""
    head = {
        "Host": "test",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    request = f"POST /v2/models/{name}/infer HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    with connect(url) as sock:
        sock.sendall(request.encode("latin-1") + b"\r\n" + body)
        answer = read_response(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        return answer, read_response(sock)[0]


def assert_oip_error(answer, low: int = 400, high: int = 499) -> str:
    status, headers, body = answer
    assert low <= status <= high, (status, body)
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert headers.get("connection") != "close"
    return body["error"]


@pytest.mark.parametrize(
    ("body", "header_length", "status", "says"),
    [case[1:] for case in ISSUE_BODIES],
    ids=[case[0] for case in ISSUE_BODIES],
)
def test_the_issues_bodies_get_a_4xx_in_the_oip_shape_on_a_kept_connection(
    server, body, header_length, status, says
):
    url, _, name = server
    headers = {oip.HEADER_LENGTH: header_length} if header_length is not None else {}
    answer, then = infer_then_healthz(url, name, body, headers)
    assert says in assert_oip_error(answer, status, status) and then == 200


def test_a_flood_of_empty_strings_gets_413_before_it_is_all_sent(server):
    """The issue's 16.5 MB of 3.3 M empty strings: 413 (the protocol's shape) once its first chunks are
    counted, before the client has sent the rest; the server drops the rest and serves the next request."""
    url, _, name = server
    flood = flood_body()
    head = f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(flood)}\r\n\r\n"
    with connect(url) as sock:
        sock.sendall(head.encode() + flood[:1_000_000])
        answer = read_response(sock)
        assert "more than 10000 values" in assert_oip_error(answer, 413, 413)
        sock.sendall(flood[1_000_000:] + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_the_body_is_parsed_off_the_event_loop(server, monkeypatch):
    _, client, name = server
    parse, on_loop = oip.parse_request, []

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop running in this thread: a worker thread
            on_loop.append(False)
        return parse(*args, **kwargs)

    monkeypatch.setattr(oip, "parse_request", recording)
    assert infer_json(client, name, image_input(B64)).status_code == 200
    assert on_loop == [False]


def test_a_gap_in_the_codec_is_400_and_a_bug_is_500_both_in_the_oip_shape(server, monkeypatch):
    """Whatever the codec raises on a body is the body's fault (400); a failure after it is a bug (500,
    logged); both in the protocol's shape, and the connection stays open."""
    url, _, name = server
    body = json.dumps({"inputs": image_input(B64)}).encode()

    def gap(*args, **kwargs):
        raise TypeError("a check the codec lacks")

    monkeypatch.setattr(oip, "parse_request", gap)
    answer, then = infer_then_healthz(url, name, body)
    assert "malformed" in assert_oip_error(answer, 400, 400) and then == 200
    monkeypatch.undo()

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(oip, "detection_tensors", bug)
    answer, then = infer_then_healthz(url, name, body)
    assert "internal" in assert_oip_error(answer, 500, 500) and then == 200


def test_every_v2_error_is_in_the_oip_shape(server, tiny_checkpoint):
    """Not only the infer route's: an unknown /v2 path (404), a wrong method (405), an unknown model's
    metadata (404), a body over the upload limit declared by Content-Length (413) and admission's refusals.
    Other paths keep the service's shape."""
    url, client, name = server
    for method, path, status in (
        ("GET", "/v2/nope", 404),
        ("GET", f"/v2/models/{name}/infer", 405),
        ("GET", "/v2/models/other", 404),
        ("GET", "/v2/models/other/ready", 404),
    ):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error"}, (path, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"], (path, r.text)
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    big = 8 * 1024 * 1024 * 1024
    head = f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {big}\r\n\r\n"
    with connect(url) as sock:
        sock.sendall(head.encode())
        status, _, body = read_response(sock)
    assert status == 413 and set(body) == {"error"} and "limit" in body["error"], body

    from service_testing import running

    app = app_for(settings(model=tiny_checkpoint, api_key="k3y"))
    with running(app) as keyed:
        r = keyed.get("/v2/models/whatever")
        assert r.status_code == 401 and "API key" in r.json()["error"], r.text
        r = keyed.get("/v1/model")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
