"""Training checkpoints: the model checkpoint (``model.checkpoint``) plus a ``training`` entry with
everything ``--resume`` needs to continue exactly: options, iteration, optimizer, scheduler, RNG states
and the best validation score so far. Written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from model.network import RefineDet

TRAINING_KEY = "training"


def rng_state() -> dict[str, Any]:
    """Every RNG's state, as tensors and plain values (so ``torch.load(weights_only=True)`` reads it)."""
    numpy_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    name, keys, pos, has_gauss, cached = numpy_state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_training_checkpoint(
    path: str | Path,
    model: RefineDet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    options: dict[str, Any],
    metadata: dict[str, Any],
    best: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` atomically; ``iteration`` counts the optimizer steps done."""
    training = {
        "iteration": iteration,
        "options": options,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "best": best,
    }
    return save_checkpoint(path, model, metadata, extra={TRAINING_KEY: training})


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint of a training run (``CheckpointError`` if it has no training state)."""
    ckpt = read_checkpoint(path)
    if TRAINING_KEY not in ckpt:
        raise CheckpointError(
            f"{path} holds model weights but no training state, so it cannot be resumed; "
            "start a new run (use --pretrained PATH to begin from its backbone)"
        )
    return ckpt
