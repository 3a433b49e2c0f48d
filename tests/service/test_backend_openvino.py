"""The OpenVINO backend over a tiny exported stand-in: chosen for an ONNX model when asked, the same
answers as ONNX Runtime within its precision, one-thread streams for concurrent engine calls."""

from __future__ import annotations

import pytest
import torch
from service_testing import StandIn, app_for, encode, noise_image, plan_for, running, settings, tiny_config

from model.artifacts import Manifest, write_manifest
from model.checkpoint import file_sha256
from model.errors import UserError
from model.network import OUTPUT_NAMES
from service.backends import create_backend
from service.detector import BatchDetector

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config()
    path = tmp_path_factory.mktemp("ov") / "standin.onnx"
    names = list(OUTPUT_NAMES)
    torch.onnx.export(StandIn(config).eval(), (torch.zeros(2, 3, 64, 64),), str(path), dynamo=False,
                      opset_version=17, input_names=["images"], output_names=names,
                      dynamic_axes={n: {0: "batch"} for n in ["images", *names]})  # fmt: skip
    write_manifest(path, Manifest("onnx", config, file_sha256(path)))
    return path


def built(s):
    return create_backend(plan_for(s), s)


def loaded(path, tmp_path, **changes):
    backend = built(settings(model=path, backend="openvino", cache_dir=tmp_path, **changes))
    backend.load()
    return backend


def test_openvino_is_planned_for_an_onnx_model_on_the_cpu_only(onnx_model, tmp_path):
    """deploy.prepare (the one decision) plans --backend openvino on the CPU, and refuses it on a GPU."""
    from deploy.host import GpuInfo, Probes
    from deploy.prepare import prepare

    cpu = Probes(gpu=lambda: None, torch_cuda=lambda: False)
    plan = prepare(settings(model=onnx_model, backend="openvino", device="auto"), cpu)
    assert (plan.backend, plan.device, plan.artifact, plan.engine) == (
        "openvino",
        "cpu",
        onnx_model,
        "openvino-fp32",
    )
    gpu = Probes(gpu=lambda: GpuInfo("NVIDIA H100", "9.0"), torch_cuda=lambda: True)
    with pytest.raises(UserError, match="backend openvino runs on a CPU here"):
        prepare(settings(model=onnx_model, backend="openvino", device="cuda"), gpu)


def test_answers_like_onnxruntime_and_reports_its_precision(onnx_model, tmp_path):
    before = torch.get_num_threads()
    try:
        backend = loaded(onnx_model, tmp_path, cpu_threads=1)
        reference = built(settings(model=onnx_model, cpu_threads=1))
        reference.load()
        assert backend.name == "openvino" and backend.precision == backend.runner.inference_precision
        assert backend.precision in ("bf16", "fp16", "fp32") and any((tmp_path / "openvino").iterdir())
        x = torch.randn(3, 3, 64, 64) * 50
        for got, want in zip(backend.infer(x), reference.infer(x), strict=True):
            assert float((got - want).abs().max()) <= 3e-2 * float(want.abs().max())
        detections = BatchDetector(backend)([torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)])
        assert len(detections) == 1 and detections[0].scores.shape[0] == detections[0].labels.shape[0]
    finally:
        torch.set_num_threads(before)


def test_concurrent_engine_calls_get_one_thread_streams(onnx_model, tmp_path):
    before = torch.get_num_threads()
    try:
        backend = loaded(onnx_model, tmp_path, cpu_threads=2)
        streamed = BatchDetector(backend, cpu_streams=2)
        runner = streamed._one_thread_infer.__self__  # what a concurrent call runs
        assert (runner.threads, runner.streams) == (1, 2)
        assert runner.compiled.get_property("NUM_STREAMS") == 2
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 2  # one per stream
        assert backend.runner.compiled.get_property("INFERENCE_NUM_THREADS") == 2  # the lone call: both
        x = torch.randn(1, 3, 64, 64) * 50
        for got, want in zip(runner(x), backend.infer(x), strict=True):
            assert float((got - want).abs().max()) <= 3e-2 * float(want.abs().max())
    finally:
        torch.set_num_threads(before)


def test_served_over_http_with_backend_openvino(onnx_model, tmp_path):
    app = app_for(settings(model=onnx_model, backend="openvino", cache_dir=tmp_path))
    with running(app) as c:
        info = c.get("/v1/model").json()
        assert info["backend"] == "openvino" and info["precision"] in ("bf16", "fp16", "fp32")
        r = c.post("/detect", content=encode(noise_image(64, 48, 1)), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["model"]["backend"] == "openvino"
