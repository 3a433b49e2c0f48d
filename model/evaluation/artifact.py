"""An exported artifact (ONNX model, TensorRT engine) in the network's place in evaluation.

``ArtifactNetwork(runner)`` has what ``model.evaluation.runner`` needs from a RefineDet: ``config``,
``anchors`` [A, 4] cxcywh and ``forward(images [B, 3, S, S]) -> RefineDetOutput | DecodedOutput``, so
``refinedet eval --artifact model.onnx`` scores the artifact through the same preprocessing,
post-processing and metrics as a checkpoint. An artifact runs at its export size only; any batch size
works (the runner pads a fixed-batch or min-batch artifact's calls, as it does when serving).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from model.errors import UserError
from model.runtime import ArtifactRunner, RunnerOutput, load_runner


class ArtifactNetwork(nn.Module):
    """``runner`` as a module; ``forward`` moves images to the runner's device and outputs back."""

    def __init__(self, runner: ArtifactRunner) -> None:
        super().__init__()
        self.runner = runner
        self.config = runner.config
        self.register_buffer("anchors", runner.anchors.detach().clone(), persistent=False)

    def forward(self, images: Tensor) -> RunnerOutput:
        size = self.config.input_size
        if tuple(images.shape[-2:]) != (size, size):
            raise UserError(
                f"an exported artifact runs at its input size {size} only (got {tuple(images.shape[-2:])}); "
                "evaluate the checkpoint for the multi-scale test"
            )
        outputs = self.runner(images.to(self.runner.device))  # the runner chunks and pads the batch
        return type(outputs)(*(t.to(images.device) for t in outputs))


def load_artifact_network(path: str | Path, device: torch.device) -> ArtifactNetwork:
    """The artifact at ``path`` (with its manifest) run on ``device``."""
    return ArtifactNetwork(load_runner(path, device=device)).eval()
