"""Batching for the detection data sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict[str, Any]]]:
    """[(image uint8 [3, S, S], target), ...] -> (images uint8 Tensor[B, 3, S, S], [target, ...]).

    Images must share one size (use a transform); targets stay a list (G differs per image).
    """
    images = [image for image, _ in batch]
    if len({tuple(im.shape) for im in images}) > 1:
        raise ValueError(
            f"images of different sizes cannot be batched: {sorted({tuple(im.shape) for im in images})}"
        )
    return torch.stack(images), [target for _, target in batch]
