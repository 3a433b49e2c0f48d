"""What every artifact runner shares: the manifest-derived attributes and the call contract.

A runner is built from an artifact path alone (its manifest supplies config, precision and batch
limits) and is called with already-preprocessed images on its device::

    runner = OnnxRuntimeRunner("model.onnx")           # or TensorRTRunner("model.plan")
    outputs = runner(preprocess(images, runner.config.input_size, runner.config.normalization))
    detections = run_postprocess(runner, outputs)      # the shared model.postprocess path

``__call__`` returns ``RefineDetOutput`` (the four raw head tensors, float32) for a "raw" artifact
and ``DecodedOutput`` (boxes_xyxy, scores) for a "decoded" one, where ``decode_predictions`` already
ran inside the graph; ``model.postprocess.PostProcessor`` finishes either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.anchors import generate_anchors
from model.artifacts import ArtifactError, Manifest
from model.config import PostprocessConfig
from model.network import RefineDetOutput
from model.postprocess import DecodedOutput, Detections, PostProcessor

RunnerOutput = RefineDetOutput | DecodedOutput


class ArtifactRunner:
    """Base class: ``config``, ``anchors`` [A, 4] cxcywh on ``device``, ``precision``, ``outputs``
    ("raw" | "decoded"), ``min_batch`` / ``max_batch`` (None: unbounded) and the ``manifest``."""

    def __init__(self, manifest: Manifest, device: torch.device) -> None:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(f"device {device} requested but PyTorch sees no CUDA GPU; use device='cpu'")
        self.manifest = manifest
        self.config = manifest.config
        self.device = device
        self.precision: str = manifest.precision
        self.outputs: str = manifest.outputs
        self.max_batch: int | None = manifest.max_batch
        self.min_batch: int = manifest.batch or 1  # a TensorRT profile may raise it
        self.anchors = generate_anchors(self.config).to(device)

    def check_images(self, images: Tensor) -> int:
        """Validate an input batch [B, 3, S, S]; returns B."""
        s = self.config.input_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ArtifactError(f"expected images [B, 3, {s}, {s}], got {list(images.shape)}")
        b = int(images.shape[0])
        if self.manifest.batch is not None and b != self.manifest.batch:
            raise ArtifactError(
                f"this artifact was exported with a fixed batch of {self.manifest.batch}, got {b}"
            )
        if self.max_batch is not None and b > self.max_batch:
            raise ArtifactError(f"batch {b} exceeds this artifact's max batch {self.max_batch}")
        return b

    def wrap(self, tensors: list[Tensor]) -> RunnerOutput:
        tensors = [t.float() for t in tensors]
        return RefineDetOutput(*tensors) if self.outputs == "raw" else DecodedOutput(*tensors)

    def __call__(self, images: Tensor) -> RunnerOutput:
        raise NotImplementedError


def run_postprocess(
    runner: ArtifactRunner, outputs: RunnerOutput, postprocess: PostprocessConfig | None = None
) -> Detections:
    """The shared post-processing of a runner's outputs, whichever kind (on the runner's device)."""
    return PostProcessor(runner.config, postprocess)(outputs, runner.anchors)
