import json

import pytest

from model.artifacts import (
    ArtifactError,
    Manifest,
    TensorRTBuild,
    check_engine_compatible,
    manifest_path,
    read_manifest,
    write_manifest,
)
from model.checkpoint import file_sha256
from model.config import preset
from model.errors import UserError


@pytest.fixture
def config():
    return preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))


def engine_manifest(config, **build):
    defaults = dict(
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        tensorrt_version="10.3.0.26",
        min_batch=1,
        opt_batch=8,
        max_batch=16,
    )
    return Manifest(
        "tensorrt", config, "0" * 64, precision="fp16", tensorrt=TensorRTBuild(**{**defaults, **build})
    )


def artifact(tmp_path, config, content=b"graph bytes", **fields):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    manifest = Manifest(
        "onnx", config, file_sha256(path), source_checkpoint_sha256="ab" * 32, onnx_opset=17, **fields
    )
    write_manifest(path, manifest)
    return path, manifest


def test_manifest_round_trip_through_file(tmp_path, config):
    path, manifest = artifact(tmp_path, config, batch=4)
    assert manifest_path(path) == tmp_path / "model.onnx.json"
    loaded = read_manifest(path)
    assert loaded == manifest
    assert loaded.config == config and loaded.class_names == ("a", "b") and loaded.input_size == 64
    assert loaded.max_batch == 4


def test_manifest_json_is_self_describing(tmp_path, config):
    path, _ = artifact(tmp_path, config)
    data = json.loads(manifest_path(path).read_text())
    assert data["format"] == "refinedet-artifact" and data["format_version"] == 1
    assert data["class_names"] == ["a", "b"] and data["input_size"] == 64
    assert data["normalization"]["mean"] == [104.0, 117.0, 123.0]
    assert data["output_names"] == ["arm_loc", "arm_conf", "odm_loc", "odm_conf"]
    assert data["batch"] is None and data["tensorrt"] is None


def test_engine_manifest_round_trip(config):
    manifest = engine_manifest(config)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest and again.max_batch == 16


def test_decoded_outputs_declare_their_shapes(config):
    manifest = Manifest("onnx", config, "0" * 64, outputs="decoded")
    assert manifest.output_names == ("boxes_xyxy", "scores")
    assert manifest.output_shapes(3) == {"boxes_xyxy": (3, 255, 4), "scores": (3, 255, 2)}


def test_missing_manifest_says_how_to_fix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"no manifest beside .*refinedet export"):
        read_manifest(path)


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        read_manifest(tmp_path / "nope.onnx")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "format marker"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(kind="pickle"), "kind must be one of"),
        (lambda d: d.update(precision="fp8"), "precision must be one of"),
        (lambda d: d.update(class_names=["x", "y"]), "class_names disagree"),
        (lambda d: d.update(output_names=["boxes_xyxy", "scores"]), "output_names"),
        (lambda d: d.pop("artifact_sha256"), "invalid manifest"),
        (lambda d: d["config"].update(bogus=1), "invalid manifest"),
    ],
)
def test_invalid_manifest_is_a_clear_error(tmp_path, config, edit, message):
    path, _ = artifact(tmp_path, config)
    data = json.loads(manifest_path(path).read_text())
    edit(data)
    manifest_path(path).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(path)


def test_manifest_that_is_not_json(tmp_path, config):
    path, _ = artifact(tmp_path, config)
    manifest_path(path).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(path)


def test_replaced_artifact_is_detected_by_hash(tmp_path, config):
    path, _ = artifact(tmp_path, config)
    path.write_bytes(b"another graph")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        read_manifest(path)
    assert read_manifest(path, verify_hash=False).kind == "onnx"


def test_tensorrt_manifest_needs_its_build_environment(config):
    with pytest.raises(ArtifactError, match="build environment"):
        Manifest("tensorrt", config, "0" * 64)


def test_engine_profile_must_be_ordered():
    with pytest.raises(ArtifactError, match="min <= opt <= max"):
        TensorRTBuild("gpu", "9.0", "10.3.0", min_batch=4, opt_batch=2, max_batch=8)


def test_engine_compatible_on_the_same_machine(config):
    assert check_engine_compatible(engine_manifest(config), "NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26") == []


def test_engine_on_another_gpu_model_with_same_capability_only_warns(config):
    warnings = check_engine_compatible(engine_manifest(config), "NVIDIA H200", "9.0", "10.3.0.26")
    assert len(warnings) == 1 and "NVIDIA H100" in warnings[0]


def test_engine_build_number_does_not_matter(config):
    assert check_engine_compatible(engine_manifest(config), "NVIDIA H100 80GB HBM3", "9.0", "10.3.0.99") == []


@pytest.mark.parametrize(
    ("capability", "version", "message"),
    [
        ("8.9", "10.3.0.26", "compute capability 9.0"),
        ("9.0", "10.4.0.1", "TensorRT 10.3.0.26"),
        ("8.0", "8.6.1", "and"),
    ],
)
def test_incompatible_engine_is_refused(config, capability, version, message):
    with pytest.raises(ArtifactError, match=message) as info:
        check_engine_compatible(engine_manifest(config), "NVIDIA H100 80GB HBM3", capability, version)
    assert "rebuild it on this machine" in str(info.value)


def test_compatibility_check_rejects_a_non_engine(config):
    with pytest.raises(ArtifactError, match="expected a TensorRT engine"):
        check_engine_compatible(Manifest("onnx", config, "0" * 64), "gpu", "9.0", "10.3.0")
