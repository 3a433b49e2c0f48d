"""OpenVinoRunner on a tiny convolutional stand-in with RefineDet's I/O contract, against ONNX Runtime on
the same file (FP32 and an INT8 QDQ version of it)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from model.artifacts import ArtifactError, Manifest, write_manifest
from model.checkpoint import file_sha256
from model.config import preset
from model.network import OUTPUT_NAMES, RefineDetOutput
from model.runtime import load_runner
from model.runtime.onnxruntime import OnnxRuntimeRunner

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
from model.runtime.openvino import OpenVinoRunner  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


class ConvStandIn(nn.Module):
    """images [B, 3, S, S] -> RefineDet's four raw tensors, through real convolutions (so that BF16 and
    INT8 kernels are exercised)."""

    def __init__(self, config):
        super().__init__()
        self.a, c = config.num_anchors, config.num_classes
        self.sizes = [4, 2, 4, c]
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.fc = nn.Linear(16, self.a * sum(self.sizes))

    def forward(self, images):
        y = self.fc(self.body(images).mean(dim=(2, 3))).reshape(images.shape[0], self.a, -1)
        return tuple(torch.split(y, self.sizes, dim=-1))


@pytest.fixture(scope="module")
def config():
    return preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, config):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp32") / "m.onnx"
    names = list(OUTPUT_NAMES)
    torch.onnx.export(
        ConvStandIn(config).eval(), (torch.zeros(2, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
        input_names=["images"], output_names=names, dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
    )  # fmt: skip
    write_manifest(path, Manifest("onnx", config, file_sha256(path)))
    return path


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory, config, fp32_onnx):
    """The stand-in statically quantized to QDQ INT8 by ONNX Runtime (random calibration images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter(
                [{"images": rng.normal(0, 50, (1, 3, 64, 64)).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self):
            return next(self.items, None)

    path = tmp_path_factory.mktemp("int8") / "m.int8.onnx"
    quantize_static(str(fp32_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ)
    write_manifest(path, Manifest("onnx", config, file_sha256(path), precision="int8"))
    return path


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 50


def assert_close_to(got: RefineDetOutput, want: RefineDetOutput, rel: float) -> None:
    """Every output within ``rel`` of the reference's largest magnitude."""
    for name, g, w in zip(want._fields, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        scale = float(w.abs().max()) or 1.0
        assert float((g - w).abs().max()) <= rel * scale, name


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_matches_onnxruntime_on_the_same_file(fp32_onnx, batch):
    runner = OpenVinoRunner(fp32_onnx, threads=1, inference_precision="fp32")
    x = images(batch)
    got = runner(x)
    assert isinstance(got, RefineDetOutput) and runner.precision == runner.inference_precision == "fp32"
    assert_close_to(got, OnnxRuntimeRunner(fp32_onnx)(x), 1e-5)


def test_default_precision_is_what_openvino_compiled_and_is_reported(fp32_onnx):
    runner = OpenVinoRunner(fp32_onnx, threads=1)
    compiled = runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert runner.precision == {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}[compiled]
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert runner.precision == "bf16"  # OpenVINO's default on a CPU with BF16 instructions
    x = images(2)
    assert_close_to(runner(x), OnnxRuntimeRunner(fp32_onnx)(x), 3e-2)  # BF16 keeps ~3 significant digits


def test_int8_qdq_model_is_int8_and_close_to_onnxruntime(int8_onnx):
    runner = OpenVinoRunner(int8_onnx, threads=1)
    assert runner.precision == "int8" and runner.inference_precision in ("bf16", "fp16", "fp32")
    x = images(2)
    assert_close_to(runner(x), OnnxRuntimeRunner(int8_onnx)(x), 5e-2)


def test_concurrent_callers_get_their_own_requests_and_right_answers(fp32_onnx):
    runner = OpenVinoRunner(fp32_onnx, threads=1, streams=2, inference_precision="fp32")
    inputs = [images(1, seed) for seed in range(4)]
    expected = [runner(x) for x in inputs]
    made: list = []
    runner.compiled = _Counting(runner.compiled, made)
    runner._local = threading.local()  # forget the main thread's request
    results: dict[int, RefineDetOutput] = {}
    start = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i] = runner(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(inputs)  # one request per calling thread, reused for its later calls
    for i, want in enumerate(expected):
        for g, w in zip(results[i], want, strict=True):
            torch.testing.assert_close(g, w)


class _Counting:
    """A compiled model that records each infer request it makes."""

    def __init__(self, compiled, made: list) -> None:
        self.compiled, self.made = compiled, made

    def create_infer_request(self):
        request = self.compiled.create_infer_request()
        self.made.append(request)
        return request


def test_load_runner_picks_openvino_when_asked(fp32_onnx):
    assert isinstance(load_runner(fp32_onnx, backend="openvino", threads=1), OpenVinoRunner)
    assert isinstance(load_runner(fp32_onnx), OnnxRuntimeRunner)  # the default for ONNX stays ORT
    with pytest.raises(ArtifactError, match="runtime 'tensorrt' cannot run"):
        load_runner(fp32_onnx, backend="tensorrt")


def test_cache_dir_holds_the_compiled_model(fp32_onnx, tmp_path):
    OpenVinoRunner(fp32_onnx, threads=1, cache_dir=tmp_path / "ov")
    assert any((tmp_path / "ov").iterdir())


def test_bad_requests_are_refused_clearly(fp32_onnx, monkeypatch):
    with pytest.raises(ArtifactError, match="CPU only"):
        OpenVinoRunner(fp32_onnx, device="cuda")
    with pytest.raises(ArtifactError, match="inference_precision must be one of"):
        OpenVinoRunner(fp32_onnx, inference_precision="int4")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(ArtifactError, match="openvino is not installed"):
        OpenVinoRunner(fp32_onnx)
