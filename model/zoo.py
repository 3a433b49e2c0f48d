"""The project's default weights: where the shipped checkpoint lives and whether it exists yet.

``refinedet serve`` without ``--model`` serves ``default_checkpoint()``: RefineDet320 VGG-16 trained on
BCCD (model card: model/checkpoints/README.md). It is an FP16 checkpoint stored xz-compressed (60 MB
instead of 68 MB; ``model.checkpoint.read_checkpoint`` reads ``.xz`` files transparently). Until a trained default is
committed to ``model/checkpoints/``, it returns None and the service builds an untrained model (and says so).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "refinedet320_vgg16_bccd.pth.xz"
DEFAULT_PRESET = "refinedet320_vgg16"
DEFAULT_CLASSES = ("Platelets", "RBC", "WBC")  # the shipped checkpoint's label order


def default_checkpoint() -> Path | None:
    """The shipped default checkpoint (RefineDet320 VGG-16 trained on BCCD), or None when absent."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def shipped_checkpoint() -> Path:
    """The default model of every command that takes one (``eval``, ``verify``, ``serve``); a
    ``UserError`` where this install ships none."""
    from model.errors import UserError

    path = default_checkpoint()
    if path is None:
        raise UserError("no model given and none shipped in this install: give --checkpoint or --artifact")
    return path
