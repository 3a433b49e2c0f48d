"""Image build check, run by docker/build.sh in both images: the serving stack imports, and the venv holds
what the image promises (CPU: a CPU-only torch; GPU: TensorRT 10 and onnxruntime's CUDA provider).
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


if __name__ == "__main__":
    main()
