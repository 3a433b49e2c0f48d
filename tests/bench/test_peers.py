"""The service's peers in the benchmark: the engine session behind them (ONNX Runtime, OpenVINO, torch on
the same file), the naive app on an ONNX model, the LitServe API's steps, and the network-only ceiling.
Tiny model, no load runs."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from bench.ceiling import network_ceiling
from bench.engine_session import default_runtime, open_session
from bench.naive_app import create_app
from model.errors import UserError
from model.network import RefineDetOutput
from model.postprocess import PostProcessor
from service.benchmark import synthetic_jpeg

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def test_every_runtime_computes_what_the_checkpoint_computes(tiny_checkpoint, tiny_onnx):
    assert default_runtime(tiny_onnx) == "onnxruntime" and default_runtime(tiny_checkpoint) == "torch"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = open_session(tiny_checkpoint)(x)
    assert isinstance(reference, RefineDetOutput)
    runtimes = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        runtimes.append("openvino")
    except ImportError:
        pass
    for runtime in runtimes:
        session = open_session(tiny_onnx, runtime, threads=1)
        assert session.runtime == runtime and session.precision == "fp32"
        outputs = session(x)
        assert isinstance(outputs, RefineDetOutput)
        for ours, theirs in zip(outputs, reference, strict=True):
            # OpenVINO computes in BF16 by default where the CPU has it (AVX512_BF16, AMX): ~1% of the range
            atol = 2e-3 if runtime == "onnxruntime" else 0.03 * float(theirs.abs().max())
            torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-3)
        assert torch.equal(session.anchors, open_session(tiny_checkpoint).anchors)


def test_a_runtime_that_cannot_run_the_file_is_refused(tiny_checkpoint, tiny_onnx):
    with pytest.raises(UserError, match="checkpoint runs on torch"):
        open_session(tiny_checkpoint, "onnxruntime")
    with pytest.raises(UserError, match="checkpoint runs on torch"):
        open_session(tiny_onnx, "torch")
    with pytest.raises(UserError, match="--runtime takes"):
        open_session(tiny_onnx, "tensorrt")


def test_naive_app_on_the_onnx_file_answers_as_on_the_checkpoint(tiny_checkpoint, tiny_onnx):
    jpeg = synthetic_jpeg(120, 90)
    answers = []
    for model in (tiny_checkpoint, tiny_onnx):
        client = TestClient(create_app(model, runtime=None, threads=1))
        r = client.post("/detect", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200
        answers.append(r.json())
    assert client.get("/v1/model").json() == {"backend": "onnxruntime", "precision": "fp32", "device": "cpu"}
    assert answers[0]["image"] == answers[1]["image"] == {"width": 120, "height": 90}
    assert [d["label"] for d in answers[0]["detections"]] == [d["label"] for d in answers[1]["detections"]]


def test_litserve_api_decodes_predicts_and_encodes(tiny_onnx):
    pytest.importorskip("litserve")
    from bench.litserve_app import DetectAPI, make_server

    api = DetectAPI(tiny_onnx, "onnxruntime", threads=1)
    assert api.api_path == "/detect"
    api.setup("cpu")
    pixels = api.decode_request(synthetic_jpeg(100, 70))
    assert pixels.shape == (3, 70, 100) and pixels.dtype == torch.uint8
    answer = api.encode_response(api.predict(pixels))
    assert answer["image"] == {"width": 100, "height": 70} and isinstance(answer["detections"], list)
    expected = PostProcessor(api.session.config)
    assert expected.postprocess == api.postprocessor.postprocess  # the shared post-processing, same config
    server = make_server(tiny_onnx, "onnxruntime", workers=2)
    assert "/v1/model" in {getattr(r, "path", None) for r in server.app.routes}


def test_ceiling_reports_batch1_latency_and_stream_throughput(tiny_checkpoint):
    ceiling = network_ceiling(tiny_checkpoint, backend="torch", streams=2, duration_s=0.3, iters=6)
    assert ceiling["engine"] == "torch-fp32" and ceiling["streams"] == 2
    assert ceiling["batch1_ms"] > 0 and ceiling["batch1_runs"] >= 5 and ceiling["images_per_s"] > 0
    assert ceiling["batch1_p90_ms"] >= ceiling["batch1_ms"]


@pytest.mark.slow
def test_litserve_app_serves_over_http_and_stops_with_its_workers(tiny_onnx, tmp_path):
    pytest.importorskip("litserve")
    import sys

    from bench import servers

    argv = [sys.executable, "-m", "bench.litserve_app", "--model", str(tiny_onnx), "--workers", "2",
            "--host", servers.HOST, "--port", "{port}"]  # fmt: skip
    with servers.running(argv, servers.server_env({}), tmp_path / "litserve.log", 120) as url:
        status, body = servers.get(f"{url}/v1/model")
        assert status == 200 and b"onnxruntime" in body
        import urllib.request

        request = urllib.request.Request(f"{url}/detect", data=synthetic_jpeg(100, 80), method="POST",
                                         headers={"Content-Type": "image/jpeg"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200 and b'"width":100' in resp.read()
    assert servers.get(f"{url}/readyz")[0] == 0  # stopped
