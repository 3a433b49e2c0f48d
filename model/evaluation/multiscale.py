"""The paper's multi-scale + flip test ("RefineDet320+/512+") and box voting, as pure functions.

Every scale runs with and without a horizontal flip; a scale may keep only boxes of a certain size,
measured in pixels of the original image (as the original test script does):

- 320 model: 320; 192 (keep boxes whose longer side > 32); 384 (shorter side < 160); 448 (< 128);
  512 (< 96); 576 (< 64); 704 (< 32).
- 512 model: 512; 256; 384; 768 (shorter side < 192); 896 (< 128).

The original also runs one non-square input (320x192 for the 320 model, 512x384 for the 512 model,
the short side along the image's short side). Our anchors (``model.anchors.generate_anchors``) are
defined for square inputs only, so **the non-square scale is skipped**; every other scale of the spec
is run. Other model sizes use the 320 schedule scaled to their input size (multiples of 64, duplicates
dropped). Detections of all runs are merged per class by box voting (``box_voting``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

VOTING_IOU = 0.45


@dataclass(frozen=True)
class ScaleRule:
    """One test scale: a square network input of ``size`` pixels and the boxes it may contribute.

    ``min_longer``: keep boxes whose longer side is > this; ``max_shorter``: keep boxes whose shorter
    side is < this (pixels of the original image; None: no limit).
    """

    size: int
    min_longer: float | None = None
    max_shorter: float | None = None

    def keep(self, boxes_xyxy: Tensor) -> Tensor:
        """Bool mask [N] of the pixel boxes [N, 4] this scale contributes."""
        wh = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
        keep = torch.ones(len(boxes_xyxy), dtype=torch.bool, device=boxes_xyxy.device)
        if self.min_longer is not None:
            keep &= wh.max(dim=1).values > self.min_longer
        if self.max_shorter is not None:
            keep &= wh.min(dim=1).values < self.max_shorter
        return keep


MULTISCALE_320 = (
    ScaleRule(320),
    ScaleRule(192, min_longer=32),
    ScaleRule(384, max_shorter=160),
    ScaleRule(448, max_shorter=128),
    ScaleRule(512, max_shorter=96),
    ScaleRule(576, max_shorter=64),
    ScaleRule(704, max_shorter=32),
)
MULTISCALE_512 = (
    ScaleRule(512),
    ScaleRule(256),
    ScaleRule(384),
    ScaleRule(768, max_shorter=192),
    ScaleRule(896, max_shorter=128),
)


def multiscale_schedule(input_size: int) -> tuple[ScaleRule, ...]:
    """The scales tested for a model trained at ``input_size`` (square scales only, see module doc)."""
    if input_size == 320:
        return MULTISCALE_320
    if input_size == 512:
        return MULTISCALE_512
    rules: dict[int, ScaleRule] = {}
    for rule in MULTISCALE_320:
        size = max(64, round(rule.size * input_size / 320 / 64) * 64)
        rules.setdefault(size, ScaleRule(size, rule.min_longer, rule.max_shorter))
    return tuple(rules.values())


def flip_boxes(boxes_xyxy: Tensor) -> Tensor:
    """Normalised boxes [N, 4] found on a horizontally flipped image -> boxes on the original."""
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    return torch.stack([1.0 - x2, y1, 1.0 - x1, y2], dim=-1)


def _overlaps(boxes_xyxy: np.ndarray, iou_threshold: float, block: int = 512) -> np.ndarray:
    """Bool [N, N]: IoU >= threshold, for boxes [N, 4] (continuous coordinates), in row blocks.

    N is one class's detections of one image over all runs: at most runs x keep_top_k (2,800 for the
    320 schedule with keep_top_k 200), so the matrix stays a few megabytes.
    """
    x1, y1, x2, y2 = boxes_xyxy.T
    area = (x2 - x1) * (y2 - y1)
    rows = []
    for i in range(0, len(boxes_xyxy), block):
        s = slice(i, i + block)
        w = np.minimum(x2[s, None], x2[None]) - np.maximum(x1[s, None], x1[None])
        h = np.minimum(y2[s, None], y2[None]) - np.maximum(y1[s, None], y1[None])
        inter = np.clip(w, 0, None, out=w) * np.clip(h, 0, None, out=h)
        rows.append(inter >= iou_threshold * np.maximum(area[s, None] + area[None] - inter, 1e-12))
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=bool)


def box_voting(
    boxes_xyxy: Tensor, scores: Tensor, iou_threshold: float = VOTING_IOU
) -> tuple[Tensor, Tensor]:
    """Merge one class's detections [N, 4] / [N] by box voting -> (boxes [M, 4], scores [M]).

    Repeatedly take the best remaining box; every remaining box with IoU >= ``iou_threshold`` with it
    (itself included) forms its cluster and is removed. A cluster becomes one box: coordinates are
    the score-weighted mean of its members, the score is the members' maximum (the leader's). A
    single-member cluster is kept as it is. Output is in descending score order, on the CPU.
    """
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    boxes = boxes_xyxy.detach().cpu()[order].double().numpy()
    weights = scores.detach().cpu()[order].double().numpy()
    overlaps = _overlaps(boxes, iou_threshold)
    cluster = np.empty(len(weights), dtype=np.int64)
    remaining = np.ones(len(weights), dtype=bool)
    leaders: list[int] = []
    for lead in range(len(weights)):  # leaders in score order; members leave the pool
        if not remaining[lead]:
            continue
        members = remaining & overlaps[lead]
        members[lead] = True
        cluster[members] = len(leaders)
        leaders.append(lead)
        remaining &= ~members
    k = len(leaders)
    total = np.bincount(cluster, weights=weights, minlength=k)
    sums = [np.bincount(cluster, weights=weights * boxes[:, j], minlength=k) for j in range(4)]
    merged = np.stack(sums, axis=1).reshape(k, 4) / np.maximum(total, 1e-12)[:, None]
    dtype = boxes_xyxy.dtype
    return torch.from_numpy(merged).to(dtype), torch.from_numpy(weights[leaders]).to(dtype)


def merge_by_voting(
    runs: Sequence[dict[str, Tensor]], iou_threshold: float = VOTING_IOU
) -> dict[str, Tensor]:
    """Per-image detections of several runs (dicts boxes [N, 4] px, scores [N], labels [N]) -> one
    dict, box voting applied per class, sorted by descending score."""
    boxes = torch.cat([r["boxes"] for r in runs])
    scores = torch.cat([r["scores"] for r in runs])
    labels = torch.cat([r["labels"] for r in runs])
    merged_boxes, merged_scores, merged_labels = [], [], []
    for label in labels.unique().tolist():
        mask = labels == label
        b, s = box_voting(boxes[mask], scores[mask], iou_threshold)
        merged_boxes.append(b)
        merged_scores.append(s)
        merged_labels.append(torch.full((len(s),), label, dtype=labels.dtype))
    if not merged_scores:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    scores = torch.cat(merged_scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    return {
        "boxes": torch.cat(merged_boxes)[order],
        "scores": scores[order],
        "labels": torch.cat(merged_labels)[order],
    }
