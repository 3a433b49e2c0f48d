import json

import numpy as np
import onnx
import pytest
import torch

from conversion.onnx_export import check_opset, export_checkpoint, export_model, parse_batch
from conversion.tensorrt_build import fp32_layers
from model.artifacts import read_manifest
from model.checkpoint import CheckpointError, file_sha256, load_model
from model.errors import UserError
from model.network import OUTPUT_NAMES
from model.postprocess import decode_predictions
from model.runtime.onnxruntime import OnnxRuntimeRunner

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_onnx_graph_declares_the_contract(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto, full_check=True)
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    assert [i.name for i in inputs] == ["images"] and dims(inputs[0]) == ["batch", 3, 64, 64]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    a = 255  # 64 input: (8*8 + 4*4 + 2*2 + 1) * 3 anchors
    assert [dims(o) for o in proto.graph.output] == [
        ["batch", a, 4],
        ["batch", a, 2],
        ["batch", a, 4],
        ["batch", a, 3],
    ]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)


def test_metadata_in_graph_and_manifest(tiny_onnx, tiny_checkpoint):
    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    assert json.loads(meta["class_names"]) == ["cell", "platelet"] and meta["input_size"] == "64"
    assert json.loads(meta["normalization"])["channel_order"] == "BGR"
    assert meta["source_checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    manifest = read_manifest(tiny_onnx)  # also checks the artifact hash
    assert manifest.kind == "onnx" and manifest.precision == "fp32" and manifest.outputs == "raw"
    assert manifest.source_checkpoint_sha256 == file_sha256(tiny_checkpoint)
    assert manifest.onnx_opset == 17 and manifest.batch is None
    assert manifest.config == load_model(tiny_checkpoint)[0].config
    assert manifest.extra["tracer_warnings"] == []  # the raw graph traces without any


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_matches_pytorch(tiny_onnx, tiny_checkpoint, batch):
    model, _ = load_model(tiny_checkpoint)
    images = torch.randn(batch, 3, 64, 64) * 50
    with torch.no_grad():
        want = model(images)
    got = OnnxRuntimeRunner(tiny_onnx)(images)
    for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
        assert g.shape == w.shape, name
        assert float((g - w).abs().max()) < 1e-4, name


def test_decoded_graph_matches_decode_predictions(tmp_path, tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    path = tmp_path / "decoded.onnx"
    manifest = export_model(model, path, outputs="decoded")
    assert manifest.output_names == ("boxes_xyxy", "scores") and manifest.extra["tracer_warnings"] == []
    images = torch.randn(3, 3, 64, 64) * 50
    with torch.no_grad():
        boxes, scores = decode_predictions(*model(images), model.anchors, model.config)
    got = OnnxRuntimeRunner(path)(images)
    assert float((got.boxes_xyxy - boxes).abs().max()) < 1e-5
    assert float((got.scores - scores).abs().max()) < 1e-5


def test_fixed_batch_export_with_another_opset(fixed_onnx):
    path = fixed_onnx
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "fixed.onnx",
        "fixed.onnx.json",
    ]  # no temporaries
    graph = onnx.load(str(path)).graph
    assert dims(graph.input[0])[0] == 2 and dims(graph.output[0])[0] == 2
    runner = OnnxRuntimeRunner(path)
    assert runner.max_batch == 2 and runner.manifest.onnx_opset == 13
    assert runner(torch.zeros(3, 3, 64, 64)).arm_loc.shape[0] == 3  # calls of 2, the second padded


def test_simplified_graph_computes_the_same(tmp_path, tiny_checkpoint, tiny_onnx):
    pytest.importorskip("onnxslim")
    path = tmp_path / "slim.onnx"
    manifest = export_checkpoint(tiny_checkpoint, path, simplify=True)
    assert manifest.extra["simplified"] is True
    images = torch.randn(2, 3, 64, 64) * 50
    for a, b in zip(OnnxRuntimeRunner(path)(images), OnnxRuntimeRunner(tiny_onnx)(images), strict=True):
        assert float((a - b).abs().max()) < 1e-4
    slim_nodes = [n.name for n in onnx.load(str(path)).graph.node]
    assert len(slim_nodes) < len(onnx.load(str(tiny_onnx)).graph.node)
    assert len(fp32_layers(slim_nodes)) == 14  # L2Norm keeps its node names: the FP16 pins still find it


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bogus.pt is not a checkpoint \(it is a text file\)$"):
        export_checkpoint(bogus, tmp_path / "m.onnx")


@pytest.mark.parametrize("opset", [10, 21])
def test_opset_range(opset):
    with pytest.raises(UserError, match="between 11 and 20"):
        check_opset(opset)


def test_parse_batch():
    assert parse_batch("dynamic") is None and parse_batch("8") == 8
    for bad in ("0", "-1", "many"):
        with pytest.raises(UserError, match="--batch must be"):
            parse_batch(bad)


def test_batch_parity_inside_one_call(tiny_onnx):
    """Each image's outputs must not depend on the rest of the batch (a known TensorRT-port trap)."""
    runner = OnnxRuntimeRunner(tiny_onnx)
    images = torch.randn(4, 3, 64, 64) * 50
    batched = runner(images)
    for i in range(4):
        single = runner(images[i : i + 1])
        for a, b in zip(batched, single, strict=True):
            np.testing.assert_allclose(a[i : i + 1].numpy(), b.numpy(), atol=1e-5)
