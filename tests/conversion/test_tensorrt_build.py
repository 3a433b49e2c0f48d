"""The TensorRT path: everything that does not need TensorRT runs here; the rest is marked tensorrt."""

import argparse
import importlib.util
from pathlib import Path

import onnx
import pytest

from conversion.cli import engine_options
from conversion.tensorrt_build import (
    BatchProfile,
    EngineOptions,
    check_tensorrt_version,
    engine_manifest,
    fp32_layers,
    read_onnx_manifest,
    resolve_profile,
)
from model.artifacts import Manifest, check_engine_compatible, read_manifest
from model.config import preset
from model.errors import UserError
from refinedet.cli import main

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes():
    assert BatchProfile(1, 4, 8).shapes(320) == ((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320))


@pytest.mark.parametrize(("lo", "opt", "hi"), [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_profile_must_be_ordered(lo, opt, hi):
    with pytest.raises(UserError, match="1 <= min <= opt <= max"):
        BatchProfile(lo, opt, hi)


def test_dynamic_profile_defaults():
    assert resolve_profile(None) == BatchProfile(1, 16, 16)
    assert resolve_profile(None, max_batch=8) == BatchProfile(1, 8, 8)
    assert resolve_profile(None, min_batch=2, opt_batch=4, max_batch=32) == BatchProfile(2, 4, 32)
    assert resolve_profile(None, opt_batch=32) == BatchProfile(1, 32, 32)


def test_fixed_batch_model_admits_only_its_batch():
    assert resolve_profile(4) == BatchProfile(4, 4, 4)
    assert resolve_profile(4, max_batch=4) == BatchProfile(4, 4, 4)
    with pytest.raises(UserError, match=r"fixed batch of 4.*--batch dynamic"):
        resolve_profile(4, max_batch=8)


def test_engine_options_validation(tmp_path):
    assert EngineOptions(workspace_gib=2).workspace_bytes == 2 << 30
    with pytest.raises(UserError, match="--precision must be one of"):
        EngineOptions(precision="fp8")
    with pytest.raises(UserError, match="--workspace"):
        EngineOptions(workspace_gib=0)
    with pytest.raises(UserError, match="--calibration-images"):
        EngineOptions(precision="int8")
    cache = tmp_path / "calib.cache"
    cache.write_bytes(b"TRT-1001-EntropyCalibration2\n")
    assert (
        EngineOptions(precision="int8", calibration_cache=cache).precision == "int8"
    )  # scales from the cache


def test_fp32_layers_found_in_the_real_graph(tiny_onnx, tmp_path, tiny_checkpoint):
    """The TensorRT ONNX parser names layers after the ONNX nodes: the patterns must hit L2Norm only."""
    names = [n.name for n in onnx.load(str(tiny_onnx)).graph.node]
    pinned = fp32_layers(names)
    assert pinned and all("_norm/" in n for n in pinned)
    assert {n.split("/")[3] for n in pinned} == {"conv4_3_norm", "conv5_3_norm"}
    assert any(n.endswith("/ReduceSum") for n in pinned) and any(n.endswith("/Sqrt") for n in pinned)
    assert not any("/conv4_3/" in n or "odm" in n for n in pinned)


def test_fp32_layers_include_the_decoding_of_a_decoded_graph():
    names = [
        "/model/backbone/conv4_3_norm/Pow",
        "/model/odm_conf/convs.0/Conv",
        "/Exp",
        "/Softmax_1",
        "/Mul_8",
    ]
    assert fp32_layers(names, "decoded") == [
        "/model/backbone/conv4_3_norm/Pow",
        "/Exp",
        "/Softmax_1",
        "/Mul_8",
    ]
    assert fp32_layers(names, "raw") == ["/model/backbone/conv4_3_norm/Pow"]


def test_tensorrt_version_check():
    check_tensorrt_version("10.3.0.26")
    for version in ("8.6.1", "11.0.0"):
        with pytest.raises(UserError, match="TensorRT 10 API"):
            check_tensorrt_version(version)


def test_engine_manifest_records_the_build_and_runs_only_there(tiny_onnx):
    onnx_manifest = read_manifest(tiny_onnx)
    options = EngineOptions(precision="fp16", profile=BatchProfile(1, 4, 8))
    m = engine_manifest(onnx_manifest, "f" * 64, options, "NVIDIA L4", "8.9", "10.3.0.26")
    assert m.kind == "tensorrt" and m.precision == "fp16" and m.max_batch == 8
    assert (m.tensorrt.min_batch, m.tensorrt.opt_batch, m.tensorrt.max_batch) == (1, 4, 8)
    assert m.config == onnx_manifest.config and m.extra["onnx_sha256"] == onnx_manifest.artifact_sha256
    assert m.source_checkpoint_sha256 == onnx_manifest.source_checkpoint_sha256
    assert Manifest.from_dict(m.to_dict()) == m
    assert check_engine_compatible(m, "NVIDIA L4", "8.9", "10.3.0.26") == []
    with pytest.raises(UserError, match=r"compute capability 8\.9"):
        check_engine_compatible(m, "NVIDIA H100", "9.0", "10.3.0.26")


def test_read_onnx_manifest_errors(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(UserError, match=r"must be an ONNX model \(\.onnx\)"):
        read_onnx_manifest(plan)
    with pytest.raises(UserError, match="artifact not found"):
        read_onnx_manifest(tmp_path / "missing.onnx")


def args(onnx_path, output, **kw):
    defaults = dict(
        onnx=Path(onnx_path),
        output=Path(output),
        precision="fp16",
        calibration_images=None,
        calibration_split="train",
        calibration_cache=None,
        calibration_batch_size=8,
        calibration_max_images=512,
        min_batch=None,
        opt_batch=None,
        max_batch=None,
        workspace=None,
        timing_cache=None,
    )
    return argparse.Namespace(**{**defaults, **kw})


def test_engine_arguments_are_validated_without_tensorrt(tiny_onnx, tmp_path, image_dir):
    options = engine_options(args(tiny_onnx, tmp_path / "m.plan", max_batch=8, workspace=1.5))
    assert options.profile == BatchProfile(1, 8, 8) and options.workspace_bytes == int(1.5 * (1 << 30))
    int8 = engine_options(
        args(tiny_onnx, tmp_path / "m.plan", precision="int8", calibration_images=image_dir)
    )
    assert len(int8.calibration_files) == 5 and int8.calibration_cache == tmp_path / "m.plan.calib"
    with pytest.raises(ValueError, match="only applies to --precision int8"):
        engine_options(args(tiny_onnx, tmp_path / "m.plan", calibration_images=image_dir))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_says_how_to_get_it(tiny_onnx, tmp_path, capsys):
    assert main(["export", "engine", "--onnx", str(tiny_onnx), "-o", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed: pip install tensorrt / use the NVIDIA container" in err
    assert "machine with an NVIDIA GPU" in err and not (tmp_path / "m.plan").exists()


def test_cli_rejects_bad_engine_arguments_before_needing_tensorrt(tiny_onnx, tmp_path, capsys):
    assert (
        main(
            [
                "export",
                "engine",
                "--onnx",
                str(tiny_onnx),
                "-o",
                str(tmp_path / "m.plan"),
                "--min-batch",
                "4",
                "--max-batch",
                "2",
            ]
        )
        == 2
    )
    assert "1 <= min <= opt <= max" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "engine",
                "--onnx",
                str(tiny_onnx),
                "-o",
                str(tmp_path / "m.plan"),
                "--precision",
                "int8",
            ]
        )
        == 2
    )
    assert "--calibration-images" in capsys.readouterr().err


# --- needs TensorRT 10 and a CUDA GPU: NEVER RUN on the machines this project was developed on ----------


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_engine_matches_pytorch(tiny_onnx, tiny_checkpoint, image_dir, tmp_path, precision):
    from conversion.tensorrt_build import build_engine
    from conversion.verify import image_batches, image_files, verify_artifact
    from model.checkpoint import load_model
    from model.runtime.tensorrt import TensorRTRunner

    plan = tmp_path / "m.plan"
    cache = tmp_path / "timing.cache"
    manifest = build_engine(
        tiny_onnx, plan, EngineOptions(precision=precision, profile=BatchProfile(1, 4, 4), timing_cache=cache)
    )
    assert cache.is_file() and manifest.precision == precision
    runner = TensorRTRunner(plan)
    assert runner.max_batch == 4 and runner.anchors.device.type == "cuda"
    model, _ = load_model(tiny_checkpoint)
    batches = image_batches(image_files(image_dir), 64, model.config.normalization, 4)  # batches of 4 and 1
    report = verify_artifact(model, runner, batches, str(plan))
    assert report.passed, report.format()


@pytest.mark.tensorrt
def test_int8_engine_with_calibration_cache(tiny_onnx, tiny_checkpoint, image_dir, tmp_path):
    from conversion.tensorrt_build import build_engine
    from conversion.verify import image_files

    cache = tmp_path / "calib.cache"
    files = tuple(image_files(image_dir))
    options = EngineOptions(
        precision="int8",
        profile=BatchProfile(1, 2, 4),
        calibration_files=files,
        calibration_cache=cache,
        calibration_batch_size=2,
    )
    manifest = build_engine(tiny_onnx, tmp_path / "m.plan", options)
    assert cache.is_file() and manifest.precision == "int8" and manifest.tensorrt.int8_calibration
    again = build_engine(
        tiny_onnx,
        tmp_path / "m2.plan",
        EngineOptions(precision="int8", profile=BatchProfile(1, 2, 4), calibration_cache=cache),
    )
    assert again.precision == "int8"


def test_config_of_engine_manifest_matches_onnx(tiny_onnx):
    """A cheap guard that the test fixture is what the TensorRT tests above assume."""
    assert read_manifest(tiny_onnx).config == preset(
        "refinedet320_vgg16", input_size=64, class_names=("cell", "platelet")
    )
