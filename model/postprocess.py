"""The one post-processing path: ARM filtering, two-step decoding, per-class selection and NMS.

Evaluation, export verification, every serving backend and the benchmarks call these functions.

1. ``decode_predictions``: refined = decode(arm_loc, anchors); boxes = decode(odm_loc, refined);
   scores = softmax(odm_conf) without background; anchors whose ARM background probability exceeds
   ``filter_threshold`` get every class score zeroed (negative anchor filtering). Pure tensor ops, no
   data-dependent shapes: this part can live inside an exported graph.
2. ``select_detections``: per image and class keep score > ``score_threshold``, the ``top_k`` best,
   greedy NMS at ``nms_threshold``, then the ``keep_top_k`` best of the image. Batched on the device;
   the NMS is exact greedy NMS (see ``batched_greedy_nms``). Output is padded to a fixed shape.
3. ``Detections.to_pixels``: normalised boxes -> original image pixels.

Scores are the ODM softmax probability, not multiplied by ARM objectness (as in the original code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.box_coding import BoxCoder, cxcywh_to_xyxy
from model.config import PostprocessConfig, RefineDetConfig


def decode_predictions(
    arm_loc: Tensor,
    arm_conf: Tensor,
    odm_loc: Tensor,
    odm_conf: Tensor,
    anchors_cxcywh: Tensor,
    config: RefineDetConfig,
) -> tuple[Tensor, Tensor]:
    """Raw head outputs -> (boxes_xyxy Tensor[B, A, 4] normalised, scores Tensor[B, A, C-1])."""
    coder = BoxCoder(config.anchors.variances)
    anchors = anchors_cxcywh.float()
    refined = (
        coder.decode(arm_loc.float(), anchors) if config.ablation.cascade else anchors.expand_as(odm_loc)
    )
    boxes = cxcywh_to_xyxy(coder.decode(odm_loc.float(), refined))
    scores = torch.softmax(odm_conf.float(), dim=-1)[..., 1:]
    if config.ablation.negative_filtering:
        arm_bg = torch.softmax(arm_conf.float(), dim=-1)[..., :1]
        scores = scores * (arm_bg <= config.postprocess.filter_threshold)
    return boxes, scores


@dataclass
class Detections:
    """Fixed-shape batched detections. Rows with ``scores == 0`` are padding.

    boxes_xyxy: Tensor[B, M, 4] normalised to [0, 1] (not clipped); scores: Tensor[B, M];
    labels: Tensor[B, M] network class indices 1..C-1 (``class_names[label - 1]``), 0 for padding.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor

    @property
    def valid(self) -> Tensor:
        return self.scores > 0

    def image(self, i: int, score_threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Image i's real detections (boxes_xyxy [N,4], scores [N], labels [N]), best first."""
        keep = self.scores[i] > score_threshold
        return self.boxes_xyxy[i][keep], self.scores[i][keep], self.labels[i][keep]

    def to(self, device: str | torch.device) -> Detections:
        return Detections(self.boxes_xyxy.to(device), self.scores.to(device), self.labels.to(device))


def to_pixels(boxes_xyxy: Tensor, width: float, height: float, clip: bool = True) -> Tensor:
    """Normalised boxes -> pixel coordinates of an image of ``width`` x ``height``, clipped to it."""
    scale = boxes_xyxy.new_tensor([width, height, width, height])
    boxes = boxes_xyxy * scale
    if clip:
        boxes = torch.minimum(boxes.clamp(min=0), scale)
    return boxes


def box_iou_matrix(boxes_xyxy: Tensor) -> Tensor:
    """Pairwise IoU within each group: Tensor[N, K, 4] -> Tensor[N, K, K]."""
    area = (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]).clamp(min=0) * (
        boxes_xyxy[..., 3] - boxes_xyxy[..., 1]
    ).clamp(min=0)
    lt = torch.maximum(boxes_xyxy[:, :, None, :2], boxes_xyxy[:, None, :, :2])
    rb = torch.minimum(boxes_xyxy[:, :, None, 2:], boxes_xyxy[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-12)


def batched_greedy_nms(boxes_xyxy: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy NMS for many independent groups at once.

    boxes_xyxy: Tensor[N, K, 4], each group sorted by descending score; valid: Tensor[N, K] bool.
    Returns keep: Tensor[N, K] bool. Greedy NMS keeps box i iff no kept box j < i overlaps it by more
    than the threshold. That recurrence has one solution; iterating keep <- f(keep) from "all valid"
    fixes one more position per pass and stops at it as soon as an iteration changes nothing (in
    practice a handful of passes, never more than K).
    """
    if boxes_xyxy.shape[1] == 0:
        return valid.clone()
    overlaps = box_iou_matrix(boxes_xyxy.float()) > iou_threshold
    overlaps = torch.triu(overlaps, diagonal=1)  # j < i only: overlaps[n, j, i]
    keep = valid.clone()
    for _ in range(boxes_xyxy.shape[1]):
        suppressed = (overlaps & keep[:, :, None]).any(dim=1)
        new_keep = valid & ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def select_detections(
    boxes_xyxy: Tensor, scores: Tensor, config: PostprocessConfig, max_groups: int = 4096
) -> Detections:
    """Per-class threshold, top_k, NMS and keep_top_k on decoded predictions.

    boxes_xyxy: Tensor[B, A, 4]; scores: Tensor[B, A, C-1] (background excluded).
    """
    b, a, c = scores.shape
    thr = config.score_threshold
    per_class = scores.transpose(1, 2)  # [B, C-1, A]
    # One host sync: the largest candidate count bounds every per-class top_k, so NMS works on K <= top_k.
    k = int(min(config.top_k, a, int((per_class > thr).sum(dim=-1).max()) if per_class.numel() else 0))
    m = config.keep_top_k
    if k == 0:
        return Detections(
            boxes_xyxy.new_zeros(b, m, 4), scores.new_zeros(b, m), scores.new_zeros(b, m, dtype=torch.long)
        )
    top_scores, top_idx = per_class.topk(k, dim=-1)  # [B, C-1, K], sorted
    cand_boxes = torch.gather(
        boxes_xyxy[:, None].expand(b, c, a, 4), 2, top_idx[..., None].expand(b, c, k, 4)
    )
    valid = top_scores > thr
    flat_boxes, flat_valid = cand_boxes.reshape(b * c, k, 4), valid.reshape(b * c, k)
    keep = torch.cat(
        [
            batched_greedy_nms(
                flat_boxes[i : i + max_groups], flat_valid[i : i + max_groups], config.nms_threshold
            )
            for i in range(0, b * c, max_groups)
        ]
    ).reshape(b, c, k)
    kept_scores = torch.where(keep, top_scores, torch.zeros_like(top_scores)).reshape(b, c * k)
    labels = torch.arange(1, c + 1, device=scores.device).repeat_interleave(k).expand(b, c * k)
    m_eff = min(m, c * k)
    best_scores, best = kept_scores.topk(m_eff, dim=-1)
    out_boxes = torch.gather(cand_boxes.reshape(b, c * k, 4), 1, best[..., None].expand(b, m_eff, 4))
    out_labels = torch.where(best_scores > 0, torch.gather(labels, 1, best), torch.zeros_like(best))
    if m_eff < m:  # pad to the fixed keep_top_k width
        pad = m - m_eff
        out_boxes = torch.cat([out_boxes, out_boxes.new_zeros(b, pad, 4)], 1)
        best_scores = torch.cat([best_scores, best_scores.new_zeros(b, pad)], 1)
        out_labels = torch.cat([out_labels, out_labels.new_zeros(b, pad)], 1)
    return Detections(out_boxes, best_scores, out_labels)


class PostProcessor:
    """decode_predictions + select_detections for one model config; the object everyone shares."""

    def __init__(self, config: RefineDetConfig, postprocess: PostprocessConfig | None = None) -> None:
        self.config = config
        self.postprocess = postprocess or config.postprocess

    def decode(
        self, outputs: tuple[Tensor, Tensor, Tensor, Tensor], anchors_cxcywh: Tensor
    ) -> tuple[Tensor, Tensor]:
        return decode_predictions(*outputs, anchors_cxcywh, self.config)

    def __call__(self, outputs: tuple[Tensor, Tensor, Tensor, Tensor], anchors_cxcywh: Tensor) -> Detections:
        boxes, scores = self.decode(outputs, anchors_cxcywh)
        return select_detections(boxes, scores, self.postprocess)
