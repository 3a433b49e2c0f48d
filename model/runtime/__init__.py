"""Runners for exported artifacts (ONNX Runtime, OpenVINO, TensorRT), shared by verification and serving.

Every runner is built from an artifact path alone (its manifest, ``model.artifacts``) and exposes
``config``, ``anchors`` [A, 4] cxcywh on ``device``, ``device``, ``precision``, ``max_batch`` and
``__call__(images [B, 3, S, S] normalised float on device) -> RefineDetOutput | DecodedOutput``.
Runtime libraries are imported lazily, so importing this package needs none of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.artifacts import ArtifactError, read_manifest
from model.runtime.base import ArtifactRunner, DecodedOutput, RunnerOutput, run_postprocess

__all__ = ["RUNTIMES", "ArtifactRunner", "DecodedOutput", "RunnerOutput", "load_runner", "run_postprocess"]

# runtime -> the artifact kind it runs; the default runtime of a kind is the first listed for it
RUNTIMES = {"onnxruntime": "onnx", "openvino": "onnx", "tensorrt": "tensorrt"}


def load_runner(
    path: str | Path,
    device: str | torch.device = "cpu",
    verify_hash: bool = True,
    backend: str | None = None,
    threads: int | None = None,
) -> ArtifactRunner:
    """The runner for the artifact at ``path``: ``backend`` (a ``RUNTIMES`` key) or, when None, the
    default for its manifest's kind (onnx -> onnxruntime, tensorrt -> tensorrt). ``threads``: CPU
    threads per inference (ONNX Runtime's intra-op threads, OpenVINO's inference threads)."""
    manifest = read_manifest(path, verify_hash=False)
    if backend is None:
        backend = next(name for name, kind in RUNTIMES.items() if kind == manifest.kind)
    if RUNTIMES.get(backend) != manifest.kind:
        raise ArtifactError(
            f"runtime {backend!r} cannot run {path} (a {manifest.kind} artifact); "
            f"runtimes: {', '.join(n for n, k in RUNTIMES.items() if k == manifest.kind)}"
        )
    if backend == "onnxruntime":
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, device=device, intra_op_threads=threads, verify_hash=verify_hash)
    if backend == "openvino":
        from model.runtime.openvino import OpenVinoRunner

        return OpenVinoRunner(path, device=device, threads=threads, verify_hash=verify_hash)
    from model.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(path, device=device, verify_hash=verify_hash)
