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


def _iou_one_to_many(box_xyxy: Tensor, boxes_xyxy: Tensor) -> Tensor:
    lt = torch.maximum(box_xyxy[:2], boxes_xyxy[:, :2])
    rb = torch.minimum(box_xyxy[2:], boxes_xyxy[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).clamp(min=0).prod(dim=1)
    area0 = (box_xyxy[2:] - box_xyxy[:2]).clamp(min=0).prod()
    return inter / (area0 + area - inter).clamp(min=1e-12)


def box_voting(
    boxes_xyxy: Tensor, scores: Tensor, iou_threshold: float = VOTING_IOU
) -> tuple[Tensor, Tensor]:
    """Merge one class's detections [N, 4] / [N] by box voting -> (boxes [M, 4], scores [M]).

    Repeatedly take the best remaining box; every remaining box with IoU >= ``iou_threshold`` with it
    (itself included) forms its cluster and is removed. A cluster becomes one box: coordinates are
    the score-weighted mean of its members, the score is the members' maximum (the leader's). A
    single-member cluster is kept as it is. Output is in descending score order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores = boxes_xyxy[order].double(), scores[order].double()
    remaining = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    out_boxes, out_scores = [], []
    while bool(remaining.any()):
        lead = int(remaining.nonzero()[0])
        members = remaining & (_iou_one_to_many(boxes[lead], boxes) >= iou_threshold)
        members[lead] = True
        weights = scores[members]
        out_boxes.append((boxes[members] * weights[:, None]).sum(0) / weights.sum().clamp(min=1e-12))
        out_scores.append(scores[lead])
        remaining &= ~members
    if not out_boxes:
        return boxes_xyxy.new_zeros(0, 4), scores.new_zeros(0).to(boxes_xyxy.dtype)
    return torch.stack(out_boxes).to(boxes_xyxy.dtype), torch.stack(out_scores).to(boxes_xyxy.dtype)


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
