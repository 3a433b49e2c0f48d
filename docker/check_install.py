"""Image build check, run by docker/build.sh in both images: the serving stack imports, and the venv holds
what the image promises (CPU: a CPU-only torch; GPU: TensorRT 10 and onnxruntime's CUDA provider; both:
OpenVINO's CPU plugin, which compiles and runs an ONNX model after build.sh pruned the rest of OpenVINO).
One line of versions on success; an AssertionError naming the problem fails the build."""

from __future__ import annotations

import argparse
import importlib
import importlib.util


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", choices=("cpu", "gpu"), required=True)
    expect = parser.parse_args().expect

    import onnxruntime
    import torch

    # What `refinedet serve` and its first-start ONNX export import (heavy imports in the project are lazy).
    for module in (
        "refinedet.cli",
        "deploy.cli",
        "deploy.prepare",
        "service.server",
        "service.protocol",  # fails on a uvicorn without the private methods it extends
        "conversion.onnx_export",
        "onnxslim",
    ):
        importlib.import_module(module)
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision  # installed: it must work (PyPI's CUDA build fails next to a CPU torch)

        assert torchvision.__version__, "torchvision does not import"
    import httptools
    import uvicorn

    versions = [
        f"torch {torch.__version__}",
        f"onnxruntime {onnxruntime.__version__}",
        f"uvicorn {uvicorn.__version__}",
        f"httptools {httptools.__version__}",
        check_openvino(),
    ]

    providers = onnxruntime.get_available_providers()
    if expect == "cpu":
        assert torch.version.cuda is None, f"a CUDA build of torch ({torch.version.cuda}) in the CPU image"
    else:
        import tensorrt

        major = tensorrt.__version__.split(".")[0]
        assert major == "10", (
            f"TensorRT {tensorrt.__version__}: the engine builder needs TensorRT 10 (docs/deployment.md)"
        )
        assert "CUDAExecutionProvider" in providers, "onnxruntime-gpu is not in place"
        versions.append(f"TensorRT {tensorrt.__version__}")
    print(" | ".join([*versions, f"providers {','.join(providers)}"]))


def check_openvino() -> str:
    """OpenVINO's CPU plugin reads an ONNX model, compiles and runs it (what the OpenVINO CPU engine does)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnx
    import openvino
    from onnx import TensorProto, helper

    core = openvino.Core()
    assert "CPU" in core.available_devices, f"OpenVINO has no CPU device: {core.available_devices}"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "relu.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        compiled = core.compile_model(str(path), "CPU")
        y = compiled.create_infer_request().infer({0: np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)})[0]
    assert np.array_equal(y, [[0.0, 0.0, 1.0, 2.0]]), f"OpenVINO computed {y}"
    return f"openvino {openvino.__version__} ({', '.join(core.available_devices)})"


if __name__ == "__main__":
    main()
