"""``--device`` for every command: one parser, one set of error messages. Torch is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.errors import UserError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; a ``UserError`` for unknown or unavailable devices."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def check_batch_device(name: str) -> str:
    """``--device`` of the commands that take the engine plan (``predict``, ``ray-predict``): auto, cpu or
    cuda (the GPU is chosen with CUDA_VISIBLE_DEVICES there); a ``UserError`` otherwise."""
    if name.startswith("cuda:"):
        raise UserError(f"--device {name}: choose the GPU with CUDA_VISIBLE_DEVICES and use --device cuda")
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name
