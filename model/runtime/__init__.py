"""Runners for exported artifacts (ONNX Runtime, TensorRT), shared by verification and serving.

Every runner is built from an artifact path alone (its manifest, ``model.artifacts``) and exposes
``config``, ``anchors`` [A, 4] cxcywh on ``device``, ``device``, ``precision``, ``max_batch`` and
``__call__(images [B, 3, S, S] normalised float on device) -> RefineDetOutput | DecodedOutput``.
Runtime libraries are imported lazily, so importing this package needs neither of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.artifacts import ArtifactError, read_manifest
from model.runtime.base import ArtifactRunner, DecodedOutput, RunnerOutput, run_postprocess

__all__ = ["ArtifactRunner", "DecodedOutput", "RunnerOutput", "load_runner", "run_postprocess"]


def load_runner(
    path: str | Path,
    device: str | torch.device = "cpu",
    verify_hash: bool = True,
    backend: str | None = None,
    threads: int | None = None,
) -> ArtifactRunner:
    """The runner for the artifact at ``path``: ``backend`` (onnxruntime | tensorrt), else by its manifest's
    kind; ``threads``: intra-op threads on a CPU (None: the runtime's default)."""
    manifest = read_manifest(path, verify_hash=False)
    if backend in (None, "onnxruntime") and manifest.kind == "onnx":
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, device=device, intra_op_threads=threads, verify_hash=verify_hash)
    if backend not in (None, "tensorrt"):
        raise ArtifactError(f"no {backend} runner for {path} (a {manifest.kind} artifact)")
    from model.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(path, device=device, verify_hash=verify_hash)
