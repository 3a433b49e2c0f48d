import importlib.util

import pytest
import torch

from model.artifacts import ArtifactError, Manifest, TensorRTBuild, write_manifest
from model.checkpoint import file_sha256
from model.config import preset
from model.runtime import load_runner
from model.runtime.tensorrt import TENSORRT_MISSING, check_io, current_gpu, torch_dtype

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def manifest():
    config = preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))
    return Manifest(
        "tensorrt", config, "0" * 64, tensorrt=TensorRTBuild("NVIDIA L4", "8.9", "10.3.0", 1, 4, 8)
    )


def test_dtype_mapping():
    assert torch_dtype("FLOAT") is torch.float32 and torch_dtype("HALF") is torch.float16
    assert torch_dtype("INT8") is torch.int8 and torch_dtype("BOOL") is torch.bool
    with pytest.raises(ArtifactError, match="FP8 has no torch equivalent"):
        torch_dtype("FP8")


def test_engine_io_must_match_the_manifest(manifest):
    good = {
        "images": (True, "FLOAT"),
        **{n: (False, "FLOAT") for n in ("odm_conf", "arm_loc", "arm_conf", "odm_loc")},
    }
    check_io(manifest, good)  # output order does not matter: outputs are bound by name
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        check_io(manifest, {**good, "input": (True, "FLOAT")})
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        check_io(manifest, {k: v for k, v in good.items() if k != "odm_conf"})
    with pytest.raises(ArtifactError, match="no torch equivalent"):
        check_io(manifest, {**good, "odm_conf": (False, "FP4")})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_current_gpu_without_cuda():
    with pytest.raises(ArtifactError, match="CUDA GPU and none is available"):
        current_gpu(torch.device("cuda"))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_runner_without_tensorrt_says_how_to_get_it(tmp_path, manifest):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really an engine")
    write_manifest(plan, Manifest.from_dict({**manifest.to_dict(), "artifact_sha256": file_sha256(plan)}))
    with pytest.raises(ArtifactError) as info:
        load_runner(plan, device="cuda")
    assert str(info.value) == TENSORRT_MISSING


def test_runner_refuses_an_onnx_manifest(tmp_path, manifest):
    from model.runtime.tensorrt import TensorRTRunner

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    onnx_manifest = Manifest("onnx", manifest.config, file_sha256(plan))
    write_manifest(plan, onnx_manifest)
    with pytest.raises(ArtifactError, match="not a TensorRT engine"):
        TensorRTRunner(plan)
