"""OnnxRuntimeRunner on a tiny stand-in graph with RefineDet's I/O contract (fast; the real network's
export is tested in tests/conversion)."""

import pytest
import torch
from torch import nn

from model.artifacts import ArtifactError, Manifest, manifest_path, write_manifest
from model.checkpoint import file_sha256
from model.config import preset
from model.network import OUTPUT_NAMES, RefineDetOutput
from model.postprocess import Detections
from model.runtime import DecodedOutput, load_runner, run_postprocess
from model.runtime.onnxruntime import OnnxRuntimeRunner

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


class StandIn(nn.Module):
    """images [B, 3, S, S] -> four tensors shaped like RefineDet's (or two like a decoded graph)."""

    def __init__(self, config, decoded=False):
        super().__init__()
        a, c = config.num_anchors, config.num_classes
        self.sizes = [4, c - 1] if decoded else [4, 2, 4, c]
        self.a = a
        self.fc = nn.Linear(3, a * sum(self.sizes))

    def forward(self, images):
        y = self.fc(images.mean(dim=(2, 3))).reshape(images.shape[0], self.a, -1)
        parts = list(torch.split(y, self.sizes, dim=-1))
        if len(parts) == 2:
            parts[1] = torch.sigmoid(parts[1])
        return tuple(parts)


@pytest.fixture(scope="module")
def config():
    return preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))


def export(tmp_path, config, decoded=False, batch=None, kind="onnx", names=None):
    torch.manual_seed(0)
    module = StandIn(config, decoded).eval()
    path = tmp_path / "m.onnx"
    outputs = names or (["boxes_xyxy", "scores"] if decoded else list(OUTPUT_NAMES))
    dynamic = None if batch else {n: {0: "batch"} for n in ["images", *outputs]}
    torch.onnx.export(
        module,
        (torch.zeros(batch or 2, 3, 64, 64),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=outputs,
        dynamic_axes=dynamic,
    )
    extra = {}
    if kind == "tensorrt":
        from model.artifacts import TensorRTBuild

        extra["tensorrt"] = TensorRTBuild("gpu", "9.0", "10.3.0", 1, 1, 1)
    manifest = Manifest(
        kind, config, file_sha256(path), outputs="decoded" if decoded else "raw", batch=batch, **extra
    )
    write_manifest(path, manifest)
    return path, module


@pytest.mark.parametrize("batch", [1, 3])
def test_raw_outputs_match_torch(tmp_path, config, batch):
    path, module = export(tmp_path, config)
    runner = OnnxRuntimeRunner(path)
    images = torch.randn(batch, 3, 64, 64)
    out = runner(images)
    assert isinstance(out, RefineDetOutput)
    for got, want in zip(out, module(images), strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert runner.anchors.shape == (config.num_anchors, 4) and runner.device == torch.device("cpu")
    assert runner.precision == "fp32" and runner.max_batch is None and runner.config == config


def test_run_postprocess_gives_detections(tmp_path, config):
    path, _ = export(tmp_path, config)
    runner = load_runner(path)
    assert isinstance(runner, OnnxRuntimeRunner)
    detections = run_postprocess(runner, runner(torch.randn(2, 3, 64, 64)))
    assert isinstance(detections, Detections)
    assert detections.scores.shape == (2, config.postprocess.keep_top_k)


def test_decoded_graph_returns_boxes_and_scores(tmp_path, config):
    path, _ = export(tmp_path, config, decoded=True)
    runner = OnnxRuntimeRunner(path)
    out = runner(torch.randn(2, 3, 64, 64))
    assert isinstance(out, DecodedOutput)
    assert out.boxes_xyxy.shape == (2, config.num_anchors, 4) and out.scores.shape == (
        2,
        config.num_anchors,
        2,
    )
    assert run_postprocess(runner, out).labels.max() <= 2


def test_wrong_image_shape_is_refused(tmp_path, config):
    runner = OnnxRuntimeRunner(export(tmp_path, config)[0])
    with pytest.raises(ArtifactError, match=r"expected images \[B, 3, 64, 64\]"):
        runner(torch.zeros(1, 3, 32, 32))


def test_fixed_batch_artifact_takes_any_batch_in_padded_calls(tmp_path, config):
    (tmp_path / "fixed").mkdir()
    (tmp_path / "dynamic").mkdir()
    fixed = OnnxRuntimeRunner(export(tmp_path / "fixed", config, batch=2)[0])
    dynamic = OnnxRuntimeRunner(export(tmp_path / "dynamic", config)[0])
    assert (fixed.max_batch, fixed.min_batch) == (2, 2)
    images = torch.randn(5, 3, 64, 64) * 50
    expected = dynamic(images)
    for b in (1, 2, 5):  # one padded call; one exact call; calls of 2, 2 and 1 padded
        got = fixed(images[:b])
        for name, e, g in zip(expected._fields, expected, got, strict=True):
            assert g.shape[0] == b, name
            torch.testing.assert_close(g, e[:b], atol=1e-4, rtol=1e-4)


def test_engine_manifest_is_not_an_onnx_model(tmp_path, config):
    path, _ = export(tmp_path, config, kind="tensorrt")
    with pytest.raises(ArtifactError, match="not an ONNX model"):
        OnnxRuntimeRunner(path)


def test_graph_that_disagrees_with_its_manifest(tmp_path, config):
    path, _ = export(tmp_path, config, names=["a_loc", "a_conf", "o_loc", "o_conf"])
    with pytest.raises(ArtifactError, match="graph outputs"):
        OnnxRuntimeRunner(path)


def test_cuda_without_the_cuda_provider_says_what_to_install(tmp_path, config):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ArtifactError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(export(tmp_path, config)[0], device="cuda")


def test_runner_needs_the_manifest(tmp_path, config):
    path, _ = export(tmp_path, config)
    manifest_path(path).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        load_runner(path)


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(tmp_path, config):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    path, _ = export(tmp_path, config)
    images = torch.randn(4, 3, 64, 64)
    cpu = OnnxRuntimeRunner(path)(images)
    gpu = OnnxRuntimeRunner(path, device="cuda")(images.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)
