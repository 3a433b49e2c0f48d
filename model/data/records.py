"""The common core of the detection data sets: indexed annotations, box sanitising, one summary warning.

A data set indexes its annotations once, at construction, into ``ImageRecord`` s (so an epoch never
parses XML/JSON and never meets a missing file). Problems met while indexing are counted by
``DatasetProblems`` and reported in a single ``DatasetWarning`` naming the counts and an example of each.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.preprocess import load_image


class DatasetWarning(UserWarning):
    """Annotation problems that were repaired or skipped while a data set was indexed."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and its objects; boxes are xyxy pixels, clipped, with positive width and height."""

    path: Path
    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [G, 4]
    labels: np.ndarray  # int64 [G], 1..C-1
    difficult: np.ndarray  # bool [G]


# kind -> (what the count means, whether it alone is worth a warning)
PROBLEMS: dict[str, tuple[str, bool]] = {
    "missing_image": ("image files missing (images skipped)", True),
    "missing_annotation": ("annotation files missing (images skipped)", True),
    "bad_annotation": ("unreadable annotation files (images skipped)", True),
    "bad_object": ("objects without a usable box (ignored)", True),
    "clipped": ("boxes reaching outside their image (clipped to it)", True),
    "degenerate": ("zero-area boxes (dropped)", True),
    "unknown_class": ("objects of classes not in class_names (ignored)", True),
    "crowd": ("crowd regions (ignored)", False),
    "no_objects": ("images without objects (kept)", False),
}


class DatasetProblems:
    """Counts problems while a data set is indexed; ``warn`` emits them as one ``DatasetWarning``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, kind: str, example: str, count: int = 1) -> None:
        if kind not in PROBLEMS:
            raise KeyError(kind)
        if count > 0:
            self.counts[kind] += count
            self.examples.setdefault(kind, example)

    def summary(self) -> str:
        parts = [f"{n} {PROBLEMS[k][0]}, e.g. {self.examples[k]}" for k, n in self.counts.items()]
        return "; ".join(parts)

    def warn(self, name: str) -> None:
        if any(PROBLEMS[k][1] for k in self.counts):
            warnings.warn(f"{name}: {self.summary()}", DatasetWarning, stacklevel=3)


def sanitize_boxes(
    boxes_xyxy: np.ndarray, max_x: float, max_y: float, problems: DatasetProblems, where: str
) -> np.ndarray:
    """Clip boxes [G, 4] to [0, max_x] x [0, max_y]; returns the keep mask [G] (positive area).

    Clipping and dropping are counted in ``problems`` (``where`` names the image in the warning).
    """
    clipped = boxes_xyxy.copy()
    np.clip(clipped[:, 0::2], 0.0, max_x, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0.0, max_y, out=clipped[:, 1::2])
    positive = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = (clipped != boxes_xyxy).any(axis=1) & positive
    problems.add("clipped", where, int(changed.sum()))
    problems.add("degenerate", where, int((~positive).sum()))
    boxes_xyxy[:] = clipped
    return positive


class DetectionDataset(torch.utils.data.Dataset):
    """Shared behaviour of ``VOCDetection`` and ``COCODetection`` over a list of ``ImageRecord`` s.

    - ``load_image(i)`` -> uint8 RGB Tensor[3, H, W].
    - ``annotation(i)`` -> dict(boxes float Tensor[G, 4] xyxy pixels, labels int64 [G] in 1..C-1,
      difficult bool [G], image_id str, width int, height int).
    - ``dataset[i]`` -> (image, target): target = dict(boxes float Tensor[G', 4] xyxy normalised to
      [0, 1], labels, difficult, image_id, orig_size (h, w)). With a transform ``(image, boxes_px,
      labels) -> (image [3, S, S], boxes normalised, labels)`` the image is the transformed one;
      without, the original image with boxes divided by its size.
    """

    def __init__(
        self, records: list[ImageRecord], class_names: tuple[str, ...], transform: Callable | None
    ) -> None:
        self.records = records
        self.class_names = class_names
        self.transform = transform
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Tensor:
        return load_image(self.records[index].path)

    def annotation(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {
            "boxes": torch.from_numpy(r.boxes),
            "labels": torch.from_numpy(r.labels),
            "difficult": torch.from_numpy(r.difficult),
            "image_id": r.image_id,
            "width": r.width,
            "height": r.height,
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return self.sample(index, self.transform)

    def sample(
        self, index: int, transform: Callable | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """``dataset[index]`` with an explicit transform; ``generator`` is passed on to it if given.

        An image that exists but cannot be decoded is reported once and replaced by the next readable
        one, so an epoch never stops on a damaged file.
        """
        image, ann = self._load(index)
        h, w = image.shape[-2:]
        keep = torch.arange(ann["labels"].shape[0])  # the transform filters these row ids
        if transform is None:
            boxes = ann["boxes"] / torch.tensor([w, h, w, h], dtype=torch.float32)
        elif generator is None:
            image, boxes, keep = transform(image, ann["boxes"], keep)
        else:
            image, boxes, keep = transform(image, ann["boxes"], keep, generator=generator)
        target = {
            "boxes": boxes.float().reshape(-1, 4),
            "labels": ann["labels"][keep],
            "difficult": ann["difficult"][keep],
            "image_id": ann["image_id"],
            "orig_size": (int(h), int(w)),
        }
        return image, target

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        for step in range(len(self)):
            i = (index + step) % len(self)
            if i in self._unreadable:
                continue
            try:
                return self.load_image(i), self.annotation(i)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for damaged files
                self._unreadable.add(i)
                warnings.warn(
                    f"cannot decode {self.records[i].path} ({exc}); using the next image instead",
                    DatasetWarning,
                    stacklevel=3,
                )
        raise OSError("no image of this data set can be decoded")
