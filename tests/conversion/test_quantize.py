"""INT8 quantization for ONNX Runtime on the CPU (conversion.quantize), on the tiny random RefineDet.

How close INT8 must be: the signal-to-quantization-noise ratio of every output on images that were
not used for calibration, 20 log10(||fp32|| / ||int8 - fp32||), must exceed 20 dB (noise under 10% of
the signal). Uniform 8-bit quantization of one tensor gives ~40-48 dB; the ~25 quantized layers of the
network accumulate noise, and the tiny model measures 31-36 dB. A broken quantization (wrong scale,
channel axis or zero point, uncalibrated ranges) leaves the outputs unrelated to FP32: ~0 dB or less.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import helper

from conversion.calibration import calibration_batches
from conversion.quantize import (
    FP32_NODES,
    QUANTIZED_OP_TYPES,
    QuantizeOptions,
    batches_per_pass,
    fp32_node_names,
    quantize_onnx,
)
from conversion.verify import image_files
from model.artifacts import read_manifest
from model.errors import UserError
from model.runtime import load_runner, run_postprocess
from tests.conversion.conftest import write_images

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")

HEAD_CONVS = 16  # 4 heads (arm/odm x loc/conf) x 4 feature levels


@pytest.fixture(scope="session")
def tiny_int8(tmp_path_factory, tiny_onnx, image_dir):
    path = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    files = tuple(image_files(image_dir))
    quantize_onnx(tiny_onnx, path, QuantizeOptions(files=files, source=str(image_dir)))
    return path


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (candidate - reference).norm()))


def test_the_int8_model_runs_close_to_fp32_on_unseen_images(tiny_onnx, tiny_int8, tmp_path):
    fp32, int8 = load_runner(tiny_onnx), load_runner(tiny_int8)
    assert int8.precision == "int8" and int8.input_dtype == torch.float32  # callers still send float32
    files = image_files(write_images(tmp_path / "unseen", 4, seed=7))
    images = next(calibration_batches(files, fp32.config, 4))
    expected, got = fp32(images), int8(images)
    for name, a, b in zip(expected._fields, expected, got, strict=True):
        assert b.shape == a.shape and b.dtype == torch.float32
        assert sqnr_db(a, b) > 20.0, name
    detections = run_postprocess(int8, got)
    assert detections.boxes_xyxy.shape[0] == 4 and torch.isfinite(detections.scores).all()


def test_the_manifest_records_int8_and_the_calibration(tiny_int8, tiny_onnx, image_dir):
    manifest = read_manifest(tiny_int8)  # checks the artifact's sha256 too
    fp32 = read_manifest(tiny_onnx)
    assert manifest.kind == "onnx" and manifest.precision == "int8"
    assert manifest.config == fp32.config and manifest.batch is None and manifest.outputs == "raw"
    record = manifest.extra["int8"]
    assert record["calibration"]["method"] == "entropy" and record["calibration"]["images"] == 5
    assert record["calibration"]["source"] == str(image_dir)
    assert record["per_channel"] and record["format"] == "qdq"
    assert record["fp32_onnx_sha256"] == fp32.artifact_sha256
    assert len(record["fp32_nodes"]) == HEAD_CONVS
    props = {p.key: p.value for p in onnx.load(str(tiny_int8)).metadata_props}
    assert props["precision"] == "int8" and "refinedet_config" in props


def test_the_graph_is_qdq_with_per_channel_weights_and_fp32_heads(tiny_int8):
    graph = onnx.load(str(tiny_int8)).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [n for n in convs if produced_by.get(n.input[1]) is not None]
    heads = [n for n in convs if n.input[1] in initializers]  # float weights: not quantized
    assert len(heads) == HEAD_CONVS and all("_loc/" in n.name or "_conf/" in n.name for n in heads)
    assert len(quantized) == len(convs) - HEAD_CONVS > 0
    for conv in quantized:
        dq = produced_by[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        weights, scales = initializers[dq.input[0]], initializers[dq.input[1]]
        assert weights.data_type == onnx.TensorProto.INT8
        assert scales.dims == [weights.dims[0]]  # one scale per output channel
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs == {"images": onnx.TensorProto.FLOAT}


def test_an_int8_model_is_not_quantized_again(tiny_int8, image_dir, tmp_path):
    options = QuantizeOptions(files=tuple(image_files(image_dir)), source="x")
    with pytest.raises(UserError, match="not an FP32 ONNX model"):
        quantize_onnx(tiny_int8, tmp_path / "again.onnx", options)
    assert not (tmp_path / "again.onnx").exists()


def test_options_are_validated():
    with pytest.raises(UserError, match="--calibration-method must be one of entropy, minmax, percentile"):
        QuantizeOptions(files=(), source="x", method="kl")
    with pytest.raises(UserError, match="at least one image"):
        QuantizeOptions(files=(), source="x")


def fake_graph(names_and_types):
    nodes = [
        helper.make_node(op, ["x"], [f"y{i}"], name=name) for i, (name, op) in enumerate(names_and_types)
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [], []))


def test_fp32_nodes_are_the_heads_and_everything_outside_the_network():
    model = fake_graph([
        ("/model/backbone/features.0/Conv", "Conv"),
        ("/model/odm_conf/convs.3/Conv", "Conv"),
        ("/model/odm_conf/Concat", "Concat"),  # not a quantized op type: never listed
        ("/Add", "Add"),  # the decoding of an --outputs decoded graph
    ])  # fmt: skip
    names = fp32_node_names(model, FP32_NODES, QUANTIZED_OP_TYPES)
    assert names == ["/Add", "/model/odm_conf/convs.3/Conv"]
    with pytest.raises(UserError, match="matches the FP32 pattern"):
        fp32_node_names(model, ("^/model/renamed_head/",), QUANTIZED_OP_TYPES)


@pytest.mark.parametrize(("batches", "per_pass"), [(64, 8), (5, 5), (9, 3), (11, 1), (1, 1)])
def test_calibration_passes_divide_the_batches(batches, per_pass):
    assert batches_per_pass(batches) == per_pass
