"""The one post-processing path: ARM filtering, two-step decoding, per-class selection and NMS.

Evaluation, export verification, every serving backend and the benchmarks call these functions.

1. ``decode_predictions``: refined = decode(arm_loc, anchors); boxes = decode(odm_loc, refined);
   scores = softmax(odm_conf) without background; anchors whose ARM background probability exceeds
   ``filter_threshold`` get every class score zeroed (negative anchor filtering). Pure tensor ops, no
   data-dependent shapes: this part can live inside an exported graph.
2. ``select_detections``: per image and class keep score > ``score_threshold``, the ``top_k`` best,
   greedy NMS at ``nms_threshold``, then the ``keep_top_k`` best of the image. Batched on the device;
   the NMS is exact greedy NMS (see ``batched_greedy_nms``). Output is padded to a fixed shape.
   Two modes with the same result: *adaptive* (``nms_passes=None``) reads the candidate counts and NMS
   convergence on the host (cheap on the CPU) and cuts each class to its own candidates (``adaptive_nms``); *sync-free* (``nms_passes=P``, used on CUDA) uses fixed
   shapes and P NMS passes with no host synchronisation, so it can be captured in a CUDA graph with
   the network, and flags whether P passes sufficed (``Detections.converged``). ``detections_to_host``
   is the one copy to the host; it redoes the rare unconverged batch adaptively, so both modes are exact.
3. ``to_pixels``: normalised boxes -> original image pixels.

``PostProcessor`` is the entry everyone calls: it takes any stage a network, an artifact or a serving
backend stopped at (``ModelOutput``: raw heads, ``DecodedOutput`` or ``SelectedOutput``) and finishes
the rest, so no caller branches on the output type.

Scores are the ODM softmax probability, not multiplied by ARM objectness (as in the original code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from model.box_coding import BoxCoder, cxcywh_to_xyxy
from model.config import PostprocessConfig, RefineDetConfig
from model.network import RefineDetOutput


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
        scores = scores * (arm_bg <= config.filter_threshold)
    return boxes, scores


@dataclass
class Detections:
    """Fixed-shape batched detections, best first per image; rows with ``scores == 0`` are padding and
    come last (as ``select_detections`` makes them).

    boxes_xyxy: Tensor[B, M, 4] normalised to [0, 1] (not clipped); scores: Tensor[B, M];
    labels: Tensor[B, M] network class indices 1..C-1 (``class_names[label - 1]``), 0 for padding.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    converged: Tensor | None = None  # sync-free mode: bool scalar, False if NMS needed more passes

    @property
    def valid(self) -> Tensor:
        return self.scores > 0

    def image(self, i: int, score_threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Image i's real detections (boxes_xyxy [N,4], scores [N], labels [N]), best first."""
        keep = self.scores[i] > score_threshold
        return self.boxes_xyxy[i][keep], self.scores[i][keep], self.labels[i][keep]

    def per_image(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every image's real detections (boxes_xyxy [N, 4], scores [N], labels [N]) as views: one count
        for the whole batch, then slices, since the padding comes last."""
        counts = (self.scores > 0).sum(dim=1).tolist()
        return [
            (self.boxes_xyxy[i, :n], self.scores[i, :n], self.labels[i, :n]) for i, n in enumerate(counts)
        ]

    def to(self, device: str | torch.device) -> Detections:
        converged = None if self.converged is None else self.converged.to(device)
        return Detections(
            self.boxes_xyxy.to(device), self.scores.to(device), self.labels.to(device), converged
        )


def to_pixels(boxes_xyxy: Tensor, width: float, height: float, clip: bool = True) -> Tensor:
    """Normalised boxes -> pixel coordinates of an image of ``width`` x ``height``, clipped to it."""
    scale = boxes_xyxy.new_tensor([width, height, width, height])
    boxes = boxes_xyxy * scale
    if clip:
        boxes = torch.minimum(boxes.clamp(min=0), scale)
    return boxes


def box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Pairwise IoU: Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M] (leading dims broadcast).
    The project's one IoU for tensors (torchvision's ``box_iou`` is 2-D only and needs torchvision, which
    the CPU serving image does not have).

    Each coordinate is its own contiguous [..., N, 1] / [..., 1, M] operand, so every [..., N, M] step
    is one vectorised pass (broadcasting [..., N, 1, 2] against [..., 1, M, 2] instead was 2.5x slower
    on a CPU, where NMS spends most of its time here); the arithmetic is the same, in the same order:
    w = clamp(min(x2) - max(x1), 0), inter = w * h, iou = inter / clamp(area_a + area_b - inter, 1e-12).
    """
    ax1, ay1, ax2, ay2 = (c.contiguous()[..., :, None] for c in a_xyxy.unbind(-1))
    bx1, by1, bx2, by2 = (c.contiguous()[..., None, :] for c in b_xyxy.unbind(-1))
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    inter.mul_((torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0))
    area_a = (ax2 - ax1).clamp_(min=0) * (ay2 - ay1).clamp_(min=0)
    area_b = (bx2 - bx1).clamp_(min=0) * (by2 - by1).clamp_(min=0)
    return inter.div_((area_a + area_b).sub_(inter).clamp_(min=1e-12))


def box_iou_matrix(boxes_xyxy: Tensor) -> Tensor:
    """Pairwise IoU within each group: Tensor[N, K, 4] -> Tensor[N, K, K]."""
    return box_iou(boxes_xyxy, boxes_xyxy)


# NMS passes of the sync-free mode. On BCCD photos with the shipped model (122 images, 400 candidates
# per class) exact greedy NMS needed 2-10 passes including the final check; 12 leaves headroom.
SYNC_FREE_NMS_PASSES = 12
# Elements of one [groups, K, K] IoU chunk (the IoU takes ~10 such float temporaries).
NMS_CHUNK_ELEMENTS = 1 << 26


def suppression_matrix(boxes_xyxy: Tensor, iou_threshold: float, dtype: torch.dtype) -> Tensor:
    """overlaps[n, j, i] = 1 where box j comes before box i in group n and overlaps it by more than the
    threshold, else 0, in ``dtype`` (a 0/1 matrix for ``nms_pass``'s matrix product)."""
    return torch.triu(box_iou_matrix(boxes_xyxy.float()) > iou_threshold, diagonal=1).to(dtype)


def nms_pass(overlaps: Tensor, valid: Tensor, keep: Tensor) -> Tensor:
    """One step of greedy NMS's fixed-point iteration: keep i iff valid and no kept j < i overlaps it.

    All three are 0/1 matrices, valid and keep Tensor[N, 1, K]: keep @ overlaps counts the kept boxes
    that overlap each box, and relu(valid - count) is 1 exactly where that count is 0. Two kernels per
    pass; counts are integers <= K, exact in float16 up to K = 2048.
    """
    return torch.baddbmm(valid, keep, overlaps, alpha=-1).clamp_(min=0)


def nms_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def batched_greedy_nms(boxes_xyxy: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy NMS for many independent groups at once.

    boxes_xyxy: Tensor[N, K, 4], each group sorted by descending score; valid: Tensor[N, K] bool.
    Returns keep: Tensor[N, K] bool. Greedy NMS keeps box i iff no kept box j < i overlaps it by more
    than the threshold. That recurrence has one solution; iterating keep <- f(keep) from "all valid"
    fixes one more position per pass and stops at it as soon as an iteration changes nothing (in
    practice a handful of passes, never more than K). Each pass reads its convergence on the host.
    """
    if boxes_xyxy.shape[1] == 0:
        return valid.clone()
    dtype = nms_dtype(boxes_xyxy.device)
    overlaps = suppression_matrix(boxes_xyxy, iou_threshold, dtype)
    valid_f = valid.to(dtype)[:, None, :]
    keep = valid_f
    for _ in range(boxes_xyxy.shape[1]):
        new_keep = nms_pass(overlaps, valid_f, keep)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep[:, 0] > 0


def nms_buckets(lengths: list[int], budget: int = NMS_CHUNK_ELEMENTS) -> list[tuple[list[int], int]]:
    """Groups to run ``batched_greedy_nms`` on together, each bucket with the length K its groups are cut
    to: ``lengths`` (each group's candidate prefix) by decreasing length, a bucket holding groups of at
    least half its first one's length while [groups, K, K] stays within ``budget``; empty groups nowhere.
    So a class with 8 candidates is not suppressed at the 400 of the busiest class (a quarter of the
    [K, K] work at most is padding)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[tuple[list[int], int]] = []
    for i in order:
        if buckets:
            groups, k = buckets[-1]
            if 2 * lengths[i] >= k and (len(groups) + 1) * k * k <= budget:
                groups.append(i)
                continue
        buckets.append(([i], lengths[i]))
    return buckets


def adaptive_nms(boxes_xyxy: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """``batched_greedy_nms`` with each group cut to the prefix that holds its valid boxes, groups of
    similar length run together (``nms_buckets``): the same keep Tensor[N, K] bool, for less work when
    the groups' candidate counts differ (one host read of the lengths)."""
    positions = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    lengths = (valid * positions).amax(dim=1).tolist() if valid.numel() else [0] * valid.shape[0]
    keep = torch.zeros_like(valid)
    for groups, k in nms_buckets(lengths):
        index = torch.tensor(groups, device=valid.device)
        keep[index, :k] = batched_greedy_nms(boxes_xyxy[index, :k], valid[index, :k], iou_threshold)
    return keep


def fixed_pass_nms(
    boxes_xyxy: Tensor, valid: Tensor, iou_threshold: float, passes: int
) -> tuple[Tensor, Tensor]:
    """``passes`` steps of the same iteration with no host synchronisation.

    Returns (keep Tensor[N, K] bool, converged: bool scalar Tensor). ``converged`` is True when the last
    pass changed nothing, i.e. keep is the exact greedy result; otherwise keep is not final.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    dtype = nms_dtype(boxes_xyxy.device)
    overlaps = suppression_matrix(boxes_xyxy, iou_threshold, dtype)
    valid_f = valid.to(dtype)[:, None, :]
    previous, keep = valid_f, nms_pass(overlaps, valid_f, valid_f)
    for _ in range(passes - 1):
        previous, keep = keep, nms_pass(overlaps, valid_f, keep)
    return keep[:, 0] > 0, (keep == previous).all()


def select_detections(
    boxes_xyxy: Tensor, scores: Tensor, config: PostprocessConfig, nms_passes: int | None = None
) -> Detections:
    """Per-class threshold, top_k, NMS and keep_top_k on decoded predictions.

    boxes_xyxy: Tensor[B, A, 4]; scores: Tensor[B, A, C-1] (background excluded). ``nms_passes``:
    None for the adaptive mode (host syncs), an int for the sync-free mode (see the module docstring).
    """
    b, a, c = scores.shape
    thr = config.score_threshold
    per_class = scores.transpose(1, 2)  # [B, C-1, A]
    if nms_passes is None:
        # One host sync: the largest candidate count bounds every per-class top_k, so NMS works on K <= top_k.
        k = int(min(config.top_k, a, int((per_class > thr).sum(dim=-1).max()) if per_class.numel() else 0))
    else:
        k = min(config.top_k, a)  # a fixed shape; invalid candidates are masked, so the result is the same
    m = config.keep_top_k
    converged = None if nms_passes is None else torch.ones((), dtype=torch.bool, device=scores.device)
    if k == 0 or c == 0:
        return Detections(
            boxes_xyxy.new_zeros(b, m, 4),
            scores.new_zeros(b, m),
            scores.new_zeros(b, m, dtype=torch.long),
            converged,
        )
    top_scores, top_idx = per_class.topk(k, dim=-1)  # [B, C-1, K], sorted
    cand_boxes = torch.gather(
        boxes_xyxy[:, None].expand(b, c, a, 4), 2, top_idx[..., None].expand(b, c, k, 4)
    )
    valid = top_scores > thr
    flat_boxes, flat_valid = cand_boxes.reshape(b * c, k, 4), valid.reshape(b * c, k)
    if nms_passes is None:
        keep = adaptive_nms(flat_boxes, flat_valid, config.nms_threshold).reshape(b, c, k)
    else:
        chunk = max(1, NMS_CHUNK_ELEMENTS // (k * k))
        keeps, dones = [], []
        for i in range(0, b * c, chunk):
            group_boxes, group_valid = flat_boxes[i : i + chunk], flat_valid[i : i + chunk]
            group_keep, done = fixed_pass_nms(group_boxes, group_valid, config.nms_threshold, nms_passes)
            keeps.append(group_keep)
            dones.append(done)
        converged = torch.stack(dones).all()
        keep = torch.cat(keeps).reshape(b, c, k)
    kept_scores = torch.where(keep, top_scores, torch.zeros_like(top_scores)).reshape(b, c * k)
    labels = (torch.arange(c * k, device=scores.device) // k + 1).expand(b, c * k)  # class of each slot
    m_eff = min(m, c * k)
    best_scores, best = kept_scores.topk(m_eff, dim=-1)
    out_boxes = torch.gather(cand_boxes.reshape(b, c * k, 4), 1, best[..., None].expand(b, m_eff, 4))
    out_labels = torch.where(best_scores > 0, torch.gather(labels, 1, best), torch.zeros_like(best))
    if m_eff < m:  # pad to the fixed keep_top_k width
        pad = m - m_eff
        out_boxes = torch.cat([out_boxes, out_boxes.new_zeros(b, pad, 4)], 1)
        best_scores = torch.cat([best_scores, best_scores.new_zeros(b, pad)], 1)
        out_labels = torch.cat([out_labels, out_labels.new_zeros(b, pad)], 1)
    return Detections(out_boxes, best_scores, out_labels, converged)


def detections_to_host(
    detections: Detections, boxes_xyxy: Tensor, scores: Tensor, config: PostprocessConfig
) -> Detections:
    """The one device -> host copy of a batch's detections. A sync-free result whose NMS had not
    converged is recomputed from its decoded ``boxes_xyxy``/``scores`` in the adaptive mode, so the
    answer is always exact greedy NMS."""
    host = detections.to("cpu")
    if host.converged is not None and not bool(host.converged):
        host = select_detections(boxes_xyxy, scores, config).to("cpu")
    return Detections(host.boxes_xyxy, host.scores, host.labels)


class DecodedOutput(NamedTuple):
    """What ``decode_predictions`` returns (an artifact exported with ``--outputs decoded`` returns it too)."""

    boxes_xyxy: Tensor  # [B, A, 4] normalised corners, not clipped
    scores: Tensor  # [B, A, C-1] class probabilities after negative anchor filtering (no background)


class SelectedOutput(NamedTuple):
    """Detections selected on the device without a host sync (the sync-free mode: ``converged`` set), with
    the decoded boxes and scores they came from, for ``detections_to_host``'s exact redo (the torch
    backend's fused CUDA graphs return this)."""

    detections: Detections
    boxes_xyxy: Tensor  # [B, A, 4]
    scores: Tensor  # [B, A, C-1]


# Any stage of the pipeline: raw head tensors, decoded boxes and scores, or selected detections.
ModelOutput = RefineDetOutput | DecodedOutput | SelectedOutput


class PostProcessor:
    """The one post-processing entry for one model config: whatever stage a network, artifact or backend
    stopped at (``ModelOutput``), it finishes the rest. Nobody else branches on the output type.

    ``nms_passes``: "auto" (sync-free with ``SYNC_FREE_NMS_PASSES`` on CUDA tensors, adaptive on the
    CPU), None (always adaptive) or a pass count (always sync-free).
    """

    def __init__(
        self,
        config: RefineDetConfig,
        postprocess: PostprocessConfig | None = None,
        nms_passes: int | str | None = "auto",
    ) -> None:
        if isinstance(nms_passes, str) and nms_passes != "auto":
            raise ValueError(f"nms_passes must be 'auto', None or an int, got {nms_passes!r}")
        self.config = config
        self.postprocess = postprocess or config.postprocess
        self.nms_passes = nms_passes

    def passes_for(self, device: torch.device) -> int | None:
        if self.nms_passes == "auto":
            return SYNC_FREE_NMS_PASSES if device.type == "cuda" else None
        return self.nms_passes  # type: ignore[return-value]

    def decode(self, outputs: ModelOutput, anchors_cxcywh: Tensor | None = None) -> DecodedOutput:
        """Any output -> decoded boxes and scores (decoding raw heads against ``anchors_cxcywh``)."""
        if isinstance(outputs, SelectedOutput):
            return DecodedOutput(outputs.boxes_xyxy, outputs.scores)
        if isinstance(outputs, DecodedOutput):
            return outputs
        if anchors_cxcywh is None:
            raise ValueError("raw head outputs need the anchors to be decoded")
        return DecodedOutput(*decode_predictions(*outputs, anchors_cxcywh, self.config))

    def to_stage_of(
        self, raw: RefineDetOutput, other: ModelOutput, anchors_cxcywh: Tensor
    ) -> tuple[Tensor, ...]:
        """``raw`` brought to the stage of ``other`` (raw or decoded), to compare them tensor by tensor."""
        if isinstance(other, SelectedOutput):
            raise ValueError("selected detections have no tensor-by-tensor counterpart")
        return self.decode(raw, anchors_cxcywh) if isinstance(other, DecodedOutput) else raw

    def __call__(self, outputs: ModelOutput, anchors_cxcywh: Tensor | None = None) -> Detections:
        """Exact detections on the outputs' device (adaptive mode, or a sync-free selection kept as it
        is when it converged)."""
        if isinstance(outputs, SelectedOutput) and _converged(outputs.detections):
            return outputs.detections
        return select_detections(*self.decode(outputs, anchors_cxcywh), self.postprocess)

    def to_host(self, outputs: ModelOutput, anchors_cxcywh: Tensor | None = None) -> Detections:
        """Finish the post-processing and copy to the host, exact in either mode. Selection runs
        sync-free on CUDA (unless configured otherwise) so the copy is the one wait for the device."""
        if isinstance(outputs, SelectedOutput):
            selected = outputs.detections
            boxes, scores = outputs.boxes_xyxy, outputs.scores
        else:
            boxes, scores = self.decode(outputs, anchors_cxcywh)
            selected = select_detections(boxes, scores, self.postprocess, self.passes_for(scores.device))
        return detections_to_host(selected, boxes, scores, self.postprocess)


def _converged(detections: Detections) -> bool:
    return detections.converged is None or bool(detections.converged)
