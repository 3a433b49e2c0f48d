"""Runners for exported artifacts (ONNX Runtime, TensorRT), shared by verification and serving.

Every runner is built from an artifact path alone (its manifest, ``model.artifacts``) and exposes
``config``, ``anchors`` [A, 4] cxcywh on ``device``, ``device``, ``precision``, ``max_batch`` and
``__call__(images [B, 3, S, S] normalised float on device) -> RefineDetOutput | DecodedOutput``.
Runtime libraries are imported lazily, so importing this package needs neither of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.artifacts import read_manifest
from model.runtime.base import ArtifactRunner, DecodedOutput, RunnerOutput, run_postprocess

__all__ = ["ArtifactRunner", "DecodedOutput", "RunnerOutput", "load_runner", "run_postprocess"]


def load_runner(
    path: str | Path, device: str | torch.device = "cpu", verify_hash: bool = True
) -> ArtifactRunner:
    """The runner for the artifact at ``path``, chosen by its manifest's kind."""
    manifest = read_manifest(path, verify_hash=False)
    if manifest.kind == "onnx":
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, device=device, verify_hash=verify_hash)
    from model.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(path, device=device, verify_hash=verify_hash)
