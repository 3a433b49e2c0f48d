"""Run an exported ONNX model (FP32 or the INT8 QDQ one) with OpenVINO on the CPU.

The same ``.onnx`` file and manifest ONNX Runtime runs; OpenVINO compiles it for this CPU and chooses
its own inference precision (BF16 where the CPU has it, e.g. AVX512-BF16 or AMX; FP32 otherwise). The
precision it actually uses is read back from the compiled model and reported, so that verification
applies the right tolerances: ``precision`` is "int8" for a QDQ model, else "bf16" / "fp16" / "fp32" as
compiled (``inference_precision`` holds the compiled hint in both cases).

Concurrency: one compiled model, one infer request per calling thread (``threading.local``), so several
engine slots may call the runner at once. ``streams=1`` (default) is OpenVINO's LATENCY configuration:
one stream with ``threads`` threads for one caller at a time (concurrent callers queue on it);
``streams=N`` compiles N streams of ``threads`` threads each, so that N callers run side by side.
``cache_dir`` turns on OpenVINO's model cache (a later start loads the compiled blob instead of
compiling). ``openvino`` is imported inside the class: importing this module costs nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.artifacts import ArtifactError, read_manifest
from model.runtime.base import ArtifactRunner

# OpenVINO element type names (ov.Type.get_type_name()) -> this project's precision names.
OV_PRECISIONS = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}
PRECISION_HINTS = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}  # the reverse, for a requested hint


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ArtifactError(
            "openvino is not installed: pip install 'refinedet[serve]' (or openvino)"
        ) from None
    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO's version (without importing it), None when it is absent."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class OpenVinoRunner(ArtifactRunner):
    """``OpenVinoRunner(path, threads=None, streams=1, cache_dir=None, inference_precision=None)``; call
    with Tensor[B, 3, S, S] float images normalised per ``config.normalization`` (CPU only).

    ``threads``: threads per inference (None: OpenVINO's default, all cores); ``inference_precision``:
    None lets OpenVINO choose, or "fp32" / "bf16" / "fp16" to ask for one."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        verify_hash: bool = True,
        streams: int = 1,
        cache_dir: str | Path | None = None,
        inference_precision: str | None = None,
    ) -> None:
        manifest = read_manifest(path, verify_hash=verify_hash)
        if manifest.kind != "onnx":
            raise ArtifactError(f"{path} is a {manifest.kind} artifact, not an ONNX model")
        device = torch.device(device)
        if device.type != "cpu":
            raise ArtifactError(f"OpenVinoRunner runs on the CPU only, not {device}")
        if streams < 1 or (threads is not None and threads < 1):
            raise ArtifactError(f"streams and threads must be at least 1, got {streams} and {threads}")
        if inference_precision is not None and inference_precision not in PRECISION_HINTS:
            raise ArtifactError(f"inference_precision must be one of {', '.join(PRECISION_HINTS)}")
        ov = import_openvino()
        super().__init__(manifest, device)
        core = ov.Core()
        self.warnings: list[str] = []
        if cache_dir is not None:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache_dir)})
            except OSError as exc:  # a read-only cache: compile every start, say so
                self.warnings.append(f"OpenVINO model cache off ({cache_dir}: {exc.strerror or exc})")
        config = self._config(threads, streams, inference_precision)
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.streams = streams
        self.threads = threads
        self._check_graph()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.inference_precision = OV_PRECISIONS.get(hint, hint)
        self.precision = "int8" if manifest.precision == "int8" else self.inference_precision
        self._local = threading.local()
        self.version = str(ov.__version__)

    @staticmethod
    def _config(threads: int | None, streams: int, precision: str | None) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
        else:
            config["NUM_STREAMS"] = streams
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads * streams  # OpenVINO splits them over the streams
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        return config

    def _check_graph(self) -> None:
        inputs = [i.get_any_name() for i in self.compiled.inputs]
        outputs = [o.get_any_name() for o in self.compiled.outputs]
        if inputs != [self.manifest.input_name]:
            raise ArtifactError(
                f"graph inputs {inputs} do not match the manifest's '{self.manifest.input_name}'"
            )
        if outputs != list(self.manifest.output_names):
            raise ArtifactError(
                f"graph outputs {outputs} do not match the manifest's {list(self.manifest.output_names)}"
            )

    def _request(self) -> Any:
        """This thread's infer request (made on its first call)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run_batch(self, images: Tensor) -> list[Tensor]:
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        results = self._request().infer({0: x})  # copies the outputs (the request reuses its buffers)
        return [torch.from_numpy(np.asarray(results[i], dtype=np.float32)) for i in range(len(results))]
