"""Run an exported ONNX model with ONNX Runtime (CPU, or the CUDA execution provider where installed).

``onnxruntime`` is imported inside the class, so importing this module costs nothing. On CUDA the
inputs and outputs are torch tensors bound in place with IO binding (no host copies); ONNX Runtime
computes on its own stream, so the current torch stream is synchronised before the run and the
outputs are complete when ``__call__`` returns. A statically quantized (QDQ INT8) model from
``refinedet export onnx --int8`` loads the same way: its input and outputs are float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from model.artifacts import ArtifactError, read_manifest
from model.runtime.base import ArtifactRunner

# ONNX tensor type strings as ONNX Runtime reports them -> torch dtypes.
ORT_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(uint8)": torch.uint8,
}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError(
            "onnxruntime is not installed: pip install 'refinedet[serve]' (or onnxruntime-gpu)"
        ) from None
    return onnxruntime


class OnnxRuntimeRunner(ArtifactRunner):
    """``OnnxRuntimeRunner(path, device="cpu"|"cuda"|"cuda:N")``; call with Tensor[B, 3, S, S] float
    images normalised per ``config.normalization`` on ``device``."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        intra_op_threads: int | None = None,
        verify_hash: bool = True,
    ) -> None:
        manifest = read_manifest(path, verify_hash=verify_hash)
        if manifest.kind != "onnx":
            raise ArtifactError(f"{path} is a {manifest.kind} artifact, not an ONNX model")
        device = torch.device(device)
        ort = _import_onnxruntime()
        providers = self._providers(ort, device)
        super().__init__(manifest, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if device.type == "cpu":
            # ORT's threads otherwise spin for a while after each run, on the cores the shared torch
            # post-processing runs on next: on 2 cores that cost the INT8 model 15% of its latency.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if self.device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ArtifactError(
                "ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries missing or mismatched); "
                "use device='cpu' or install the onnxruntime-gpu build matching this CUDA"
            )
        self._check_graph()

    @staticmethod
    def _providers(ort, device: torch.device) -> list:
        if device.type == "cpu":
            return ["CPUExecutionProvider"]
        if device.type != "cuda":
            raise ArtifactError(f"OnnxRuntimeRunner runs on cpu or cuda, not {device}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ArtifactError(
                "this onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu (and uninstall "
                "onnxruntime), or run on device='cpu'"
            )
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]

    def _check_graph(self) -> None:
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != self.manifest.input_name:
            raise ArtifactError(
                f"graph inputs {[i.name for i in inputs]} do not match the manifest's '{self.manifest.input_name}'"
            )
        if outputs != list(self.manifest.output_names):
            raise ArtifactError(
                f"graph outputs {outputs} do not match the manifest's {list(self.manifest.output_names)}"
            )
        self.input_dtype = ORT_TO_TORCH.get(inputs[0].type)
        if self.input_dtype is None:
            raise ArtifactError(f"unsupported graph input type {inputs[0].type}")
        self._output_dtypes = [ORT_TO_TORCH.get(o.type, torch.float32) for o in self.session.get_outputs()]

    def run_batch(self, images: Tensor) -> list[Tensor]:
        x = images.to(self.device, self.input_dtype).contiguous()
        if self.device.type == "cpu":
            results = self.session.run(
                list(self.manifest.output_names), {self.manifest.input_name: x.numpy()}
            )
            return [torch.from_numpy(r) for r in results]
        return self._run_cuda(x, int(x.shape[0]))

    def _run_cuda(self, x: Tensor, batch: int) -> list[Tensor]:
        import numpy as np

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8}
        binding.bind_input(
            self.manifest.input_name, "cuda", index, np_dtype[x.dtype], tuple(x.shape), x.data_ptr()
        )
        outputs = []
        for (name, shape), dtype in zip(
            self.manifest.output_shapes(batch).items(), self._output_dtypes, strict=True
        ):
            out = torch.empty(shape, dtype=dtype, device=self.device)  # type: ignore[arg-type]
            binding.bind_output(name, "cuda", index, np_dtype[dtype], tuple(out.shape), out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # x must be written before ORT's stream reads it
        self.session.run_with_iobinding(binding)  # synchronises its outputs before returning
        return outputs
