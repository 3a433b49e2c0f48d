"""Deterministic, resumable training batches, shardable across processes.

``TrainBatchSampler`` yields, forever, the batches of one process: epoch ``e`` is a permutation of the
data set drawn from ``(seed, e)`` (padded by repeating it to whole global batches, as
``DistributedSampler`` pads), cut into global batches of which process ``rank`` takes the ``rank``-th
slice. Each sample also gets its own augmentation seed, so ``AugmentedSamples`` draws the same
augmentation for it whatever the number of loader workers, and a run resumed at iteration ``k``
(``start_iteration=k``) sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from model.data.records import DetectionDataset

Key = tuple[int, int]  # (data set index, augmentation seed)


class TrainBatchSampler:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iteration: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_iteration = rank, world_size, start_iteration
        self.global_batch = batch_size * world_size
        self.iterations_per_epoch = math.ceil(num_samples / self.global_batch)
        self._plan: tuple[int, Tensor, Tensor] | None = None

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(indices, augmentation seeds), both Tensor[iterations_per_epoch * global_batch] int64."""
        if self._plan is None or self._plan[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g)
            total = self.iterations_per_epoch * self.global_batch
            order = order.repeat(math.ceil(total / self.num_samples))[:total]
            seeds = torch.randint(0, 2**62, (total,), generator=g)
            self._plan = (epoch, order, seeds)
        return self._plan[1], self._plan[2]

    def batch(self, iteration: int) -> list[Key]:
        """This process's batch at global ``iteration``."""
        epoch, step = divmod(iteration, self.iterations_per_epoch)
        order, seeds = self.epoch_plan(epoch)
        start = step * self.global_batch + self.rank * self.batch_size
        end = start + self.batch_size
        return list(zip(order[start:end].tolist(), seeds[start:end].tolist(), strict=True))

    def __iter__(self) -> Iterator[list[Key]]:
        iteration = self.start_iteration
        while True:
            yield self.batch(iteration)
            iteration += 1


class AugmentedSamples(torch.utils.data.Dataset):
    """``samples[(index, seed)] -> dataset.sample(index, transform, generator seeded with seed)``."""

    def __init__(self, dataset: DetectionDataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> tuple[Tensor, dict[str, Any]]:
        index, seed = key
        return self.dataset.sample(index, self.transform, torch.Generator().manual_seed(seed))


class PackedBatch(NamedTuple):
    """A training batch in four pieces, so a loader worker hands over 3 tensors instead of 3 per image."""

    images: Tensor  # uint8 [B, 3, S, S]
    boxes: Tensor  # float32 [N, 4], xyxy normalised, the images' boxes one after another
    labels: Tensor  # int64 [N]
    counts: list[int]  # boxes per image, sum N

    def targets(self, device: torch.device) -> list[dict[str, Tensor]]:
        """Per-image {"boxes", "labels"} on ``device`` (one copy per tensor, then views)."""
        boxes = self.boxes.to(device, non_blocking=True).split(self.counts)
        labels = self.labels.to(device, non_blocking=True).split(self.counts)
        return [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


def pack_batch(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> PackedBatch:
    """[(image uint8 [3, S, S], target), ...] -> ``PackedBatch`` (the training loader's collate)."""
    targets = [t for _, t in batch]
    return PackedBatch(
        torch.stack([image for image, _ in batch]),
        torch.cat([t["boxes"].reshape(-1, 4) for t in targets]),
        torch.cat([t["labels"] for t in targets]),
        [int(t["labels"].shape[0]) for t in targets],
    )
