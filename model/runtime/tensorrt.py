"""Run a serialized TensorRT 10 engine (``.plan``) on torch-allocated CUDA buffers.

The engine's manifest is checked against the current GPU and TensorRT before deserializing (an engine
only runs on the compute capability and TensorRT version it was built with). Each call sets the input
shape (the batch axis of the optimization profile), binds the input and freshly allocated torch output
tensors with ``set_tensor_address`` and enqueues ``execute_async_v3`` on the current torch CUDA stream,
so the outputs are ordered with later torch work on that stream without a host synchronisation.

``tensorrt`` is imported inside ``TensorRTRunner``; the pure helpers below are testable without it.
NEVER RUN: no machine this project was developed on had TensorRT (see docs/export.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from model.artifacts import ArtifactError, Manifest, check_engine_compatible, read_manifest
from model.runtime.base import ArtifactRunner

TENSORRT_MISSING = (
    "TensorRT is not installed: pip install tensorrt / use the NVIDIA container; engines can only be "
    "built and run on a machine with an NVIDIA GPU"
)

# trt.DataType member names -> torch dtypes (DataType.FLOAT.name == "FLOAT").
TRT_TO_TORCH = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    """A TensorRT DataType name -> torch dtype; ArtifactError for types a runner cannot bind."""
    try:
        return TRT_TO_TORCH[trt_dtype_name]
    except KeyError:
        raise ArtifactError(f"engine tensor type {trt_dtype_name} has no torch equivalent") from None


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ArtifactError(TENSORRT_MISSING) from None
    return tensorrt


def current_gpu(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ArtifactError("TensorRT engines run on a CUDA GPU and none is available here")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def check_io(manifest: Manifest, io: dict[str, tuple[bool, str]]) -> None:
    """Engine I/O ({name: (is_input, dtype name)}) must be the manifest's one input and its outputs."""
    inputs = [n for n, (is_in, _) in io.items() if is_in]
    outputs = [n for n, (is_in, _) in io.items() if not is_in]
    if inputs != [manifest.input_name] or sorted(outputs) != sorted(manifest.output_names):
        raise ArtifactError(
            f"engine I/O (inputs {inputs}, outputs {outputs}) does not match the manifest "
            f"({manifest.input_name}, {list(manifest.output_names)})"
        )
    for _, dtype in io.values():
        torch_dtype(dtype)


class TensorRTRunner(ArtifactRunner):
    """``TensorRTRunner(plan_path, device="cuda")``; call with Tensor[B, 3, S, S] normalised images."""

    def __init__(
        self, plan_path: str | Path, device: str | torch.device = "cuda", verify_hash: bool = True
    ) -> None:
        manifest = read_manifest(plan_path, verify_hash=verify_hash)
        if manifest.kind != "tensorrt" or manifest.tensorrt is None:
            raise ArtifactError(f"{plan_path} is a {manifest.kind} artifact, not a TensorRT engine")
        trt = import_tensorrt()
        device = torch.device(device)
        gpu_name, capability = current_gpu(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.warnings = check_engine_compatible(manifest, gpu_name, capability, trt.__version__)
        super().__init__(manifest, device)
        self.min_batch = manifest.tensorrt.min_batch
        with torch.cuda.device(device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self.engine is None:
                raise ArtifactError(
                    f"TensorRT could not deserialize {plan_path} (see the TensorRT log above)"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        io = {
            n: (
                self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                self.engine.get_tensor_dtype(n).name,
            )
            for n in names
        }
        check_io(manifest, io)
        self._dtypes = {n: torch_dtype(dt) for n, (_, dt) in io.items()}
        self._lock = threading.Lock()  # one execution context: calls must not interleave

    def run_batch(self, images: Tensor) -> list[Tensor]:
        name = self.manifest.input_name
        x = images.to(self.device, self._dtypes[name]).contiguous()
        stream = torch.cuda.current_stream(self.device)
        with self._lock, torch.cuda.device(self.device):
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise ArtifactError(f"engine rejected input shape {list(x.shape)}")
            self.context.set_tensor_address(name, x.data_ptr())
            outputs = []
            for out_name in self.manifest.output_names:
                shape = tuple(self.context.get_tensor_shape(out_name))
                out = torch.empty(shape, dtype=self._dtypes[out_name], device=self.device)
                self.context.set_tensor_address(out_name, out.data_ptr())
                outputs.append(out)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            # x and outputs are used on `stream`; the caching allocator must not recycle x before it runs.
            x.record_stream(stream)
        return outputs
