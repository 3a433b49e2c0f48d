"""The Triton repository: config.pbtxt is parsed as a real protobuf ModelConfig (the subset of
Triton's model_config.proto we use, built here from its field names, numbers and types) and compared
with what the exported ONNX graph declares."""

import json

import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from conversion.triton import ONNX_TO_TRITON, export_triton, graph_io, preferred_batch_sizes
from model.artifacts import ArtifactError, Manifest, TensorRTBuild, read_manifest, write_manifest
from model.checkpoint import file_sha256
from model.errors import UserError
from refinedet.cli import main

F = descriptor_pb2.FieldDescriptorProto
DATA_TYPES = [
    "TYPE_INVALID",
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_UINT16",
    "TYPE_UINT32",
    "TYPE_UINT64",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
    "TYPE_BF16",
]


def _message(file, name, fields):
    msg = file.message_type.add(name=name)
    for field_name, number, ftype, label, type_name in fields:
        f = msg.field.add(name=field_name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
    return msg


@pytest.fixture(scope="module")
def ModelConfig():
    file = descriptor_pb2.FileDescriptorProto(
        name="model_config_subset.proto", package="inference", syntax="proto3"
    )
    enum = file.enum_type.add(name="DataType")
    for i, n in enumerate(DATA_TYPES):
        enum.value.add(name=n, number=i)
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    _message(
        file,
        "ModelInput",
        [
            ("name", 1, F.TYPE_STRING, opt, None),
            ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
            ("dims", 4, F.TYPE_INT64, rep, None),
        ],
    )
    _message(
        file,
        "ModelOutput",
        [
            ("name", 1, F.TYPE_STRING, opt, None),
            ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
            ("dims", 3, F.TYPE_INT64, rep, None),
        ],
    )
    _message(
        file,
        "ModelDynamicBatching",
        [
            ("preferred_batch_size", 1, F.TYPE_INT32, rep, None),
            ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, opt, None),
        ],
    )
    group = _message(
        file,
        "ModelInstanceGroup",
        [
            ("count", 2, F.TYPE_INT32, opt, None),
            ("kind", 4, F.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind"),
        ],
    )
    kind = group.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    _message(
        file,
        "ModelConfig",
        [
            ("name", 1, F.TYPE_STRING, opt, None),
            ("platform", 2, F.TYPE_STRING, opt, None),
            ("max_batch_size", 4, F.TYPE_INT32, opt, None),
            ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
            ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
            ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
            ("dynamic_batching", 11, F.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse(ModelConfig, path):
    return text_format.Parse(path.read_text(), ModelConfig())


def declared(onnx_path):
    graph = onnx.load(str(onnx_path)).graph
    init = {t.name for t in graph.initializer}

    def spec(v):
        dims = v.type.tensor_type.shape.dim
        return (
            v.name,
            ONNX_TO_TRITON[v.type.tensor_type.elem_type],
            [d.dim_value for d in dims[1:]],
            dims[0].dim_param,
        )

    return [spec(v) for v in graph.input if v.name not in init], [spec(v) for v in graph.output]


def test_config_matches_the_onnx_graph(tiny_onnx, tmp_path, ModelConfig):
    model_dir = export_triton(tiny_onnx, tmp_path / "repo", max_batch=8)
    assert model_dir == tmp_path / "repo" / "refinedet"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1",
        "1/model.onnx",
        "1/model.onnx.json",
        "config.pbtxt",
    ]
    config = parse(ModelConfig, model_dir / "config.pbtxt")
    assert config.name == "refinedet" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    inputs, outputs = declared(tiny_onnx)
    assert all(batch_axis == "batch" for *_, batch_axis in inputs + outputs)  # batch axis left out of dims
    DataType = (
        ModelConfig.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    )
    got_in = [(t.name, DataType.values_by_number[t.data_type].name, list(t.dims)) for t in config.input]
    got_out = [(t.name, DataType.values_by_number[t.data_type].name, list(t.dims)) for t in config.output]
    assert got_in == [(n, t, d) for n, t, d, _ in inputs] == [("images", "TYPE_FP32", [3, 64, 64])]
    assert got_out == [(n, t, d) for n, t, d, _ in outputs]
    assert [o[0] for o in got_out] == ["arm_loc", "arm_conf", "odm_loc", "odm_conf"] and got_out[3][2] == [
        255,
        3,
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert len(config.instance_group) == 0
    copy = read_manifest(model_dir / "1" / "model.onnx")  # the manifest travels with the model
    assert copy == read_manifest(tiny_onnx)


def test_cli_with_instance_group_and_replacing_an_existing_model(tiny_onnx, tmp_path, ModelConfig):
    repo = tmp_path / "repo"
    assert main(["export", "triton", "--onnx", str(tiny_onnx), "-o", str(repo)]) == 0
    assert (
        main(
            [
                "export",
                "triton",
                "--onnx",
                str(tiny_onnx),
                "-o",
                str(repo),
                "--instance-kind",
                "gpu",
                "--max-batch",
                "32",
                "--max-queue-delay-us",
                "500",
            ]
        )
        == 0
    )
    config = parse(ModelConfig, repo / "refinedet" / "config.pbtxt")
    assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, 1)]  # KIND_GPU
    assert sorted(p.name for p in repo.iterdir()) == ["refinedet"]  # no staging leftovers


def test_plan_repository_uses_the_engine(tiny_onnx, tmp_path, ModelConfig):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    onnx_manifest = read_manifest(tiny_onnx)
    engine = Manifest(
        "tensorrt",
        onnx_manifest.config,
        file_sha256(plan),
        precision="fp16",
        tensorrt=TensorRTBuild("NVIDIA L4", "8.9", "10.3.0", 1, 8, 16),
        extra={"onnx_sha256": onnx_manifest.artifact_sha256},
    )
    write_manifest(plan, engine)
    model_dir = export_triton(tiny_onnx, tmp_path / "repo", plan_path=plan)
    config = parse(ModelConfig, model_dir / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert json.loads((model_dir / "1" / "model.plan.json").read_text())["precision"] == "fp16"
    with pytest.raises(UserError, match="between 1 and the engine's profile maximum 16"):
        export_triton(tiny_onnx, tmp_path / "repo", plan_path=plan, max_batch=32)


def test_plan_from_another_onnx_is_refused(tiny_onnx, tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    engine = Manifest(
        "tensorrt",
        read_manifest(tiny_onnx).config,
        file_sha256(plan),
        tensorrt=TensorRTBuild("gpu", "8.9", "10.3.0", 1, 8, 16),
        extra={"onnx_sha256": "0" * 64},
    )
    write_manifest(plan, engine)
    with pytest.raises(ArtifactError, match="not built from this ONNX model"):
        export_triton(tiny_onnx, tmp_path / "repo", plan_path=plan)


def test_fixed_batch_onnx_is_refused(fixed_onnx):
    with pytest.raises(UserError, match="no dynamic batch axis"):
        graph_io(fixed_onnx)


def test_preferred_batch_sizes():
    assert preferred_batch_sizes(1) == [1]
    assert preferred_batch_sizes(8) == [4, 8]
    assert preferred_batch_sizes(12) == [4, 8, 12]
