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
        """Validate an input batch [B, 3, S, S] with B >= 1; returns B."""
        s = self.config.input_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s) or images.shape[0] < 1:
            raise ArtifactError(f"expected images [B, 3, {s}, {s}] with B >= 1, got {list(images.shape)}")
        return int(images.shape[0])

    def wrap(self, tensors: list[Tensor]) -> RunnerOutput:
        tensors = [t.float() for t in tensors]
        return RefineDetOutput(*tensors) if self.outputs == "raw" else DecodedOutput(*tensors)

    def __call__(self, images: Tensor) -> RunnerOutput:
        """Outputs for any number of images: the batch is cut into calls of at most ``max_batch`` and
        each call is padded with zero images up to ``min_batch`` (a fixed batch, or an engine profile's
        minimum); the padding rows are dropped. Evaluation, verification and serving all rely on this."""
        b = self.check_images(images)
        step = self.max_batch or b
        parts: list[list[Tensor]] = []
        for chunk in images.split(step):
            n = chunk.shape[0]
            outputs = self.run_batch(pad_batch(chunk, max(n, self.min_batch)))
            parts.append([t[:n] for t in outputs])
        if len(parts) == 1:
            return self.wrap(parts[0])
        return self.wrap([torch.cat(ts) for ts in zip(*parts, strict=True)])

    def run_batch(self, images: Tensor) -> list[Tensor]:
        """One engine call on a batch with ``min_batch <= B <= max_batch``; the output tensors in the
        manifest's order (subclasses implement it)."""
        raise NotImplementedError


def pad_batch(images: Tensor, size: int) -> Tensor:
    """Tensor[B, ...] -> Tensor[size, ...] by appending zero images (size >= B)."""
    b = images.shape[0]
    if size == b:
        return images
    return torch.cat([images, images.new_zeros((size - b, *images.shape[1:]))])


def run_postprocess(
    runner: ArtifactRunner, outputs: RunnerOutput, postprocess: PostprocessConfig | None = None
) -> Detections:
    """The shared post-processing of a runner's outputs, whichever kind (on the runner's device)."""
    return PostProcessor(runner.config, postprocess)(outputs, runner.anchors)
