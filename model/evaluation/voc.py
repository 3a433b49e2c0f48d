"""PASCAL VOC detection metrics, following the official devkit (VOCevaldet / py-faster-rcnn voc_eval).

Per class, over the whole data set:

1. Every detection of the class is sorted by descending score (a stable sort: ties keep image order,
   then the order within the image).
2. Each detection is compared with the ground truths of its image and class, *difficult ones
   included*, and takes the one with the highest IoU. If that IoU is above ``iou_threshold``
   (strictly, as ``ovmax > ovthresh`` in py-faster-rcnn and the paper's "IoU > 0.5"):
   a difficult ground truth makes the detection ignored (neither TP nor FP); a free ground truth
   makes it a TP and takes it; a ground truth already taken makes it a FP (duplicate detection).
   Otherwise it is a FP. The detection does not fall back to a second-best ground truth.
3. recall = cum TP / (non-difficult ground truths); precision = cum TP / (cum TP + cum FP).
4. AP: VOC2007 11-point interpolation (``use_07_metric=True``) or the VOC2010+ area under the
   monotone precision envelope.

IoU uses the devkit's inclusive pixel convention (widths ``x2 - x1 + 1``) by default, as the published
VOC numbers do; ``inclusive=False`` gives the continuous-coordinate IoU. A class without any
non-difficult ground truth has no defined recall: its AP is NaN and it is left out of the mean (the
devkit would divide by zero; VOC itself never has such a class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from a precision-recall curve (arrays [N], in detection order).

    The 11 recall thresholds are exactly k / 10 (py-faster-rcnn's ``np.arange(0, 1.1, 0.1)`` yields
    0.30000000000000004 and so misses a recall of exactly 0.3; that is not carried over).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:  # mean over recall t = 0, 0.1, ..., 1 of the best precision at recall >= t
        best = [precision[recall >= k / 10].max(initial=0.0) for k in range(11)]  # k / 10: exact 0.3
        return float(sum(best) / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max to the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def iou_matrix(a_xyxy: np.ndarray, b_xyxy: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Pairwise IoU of boxes [N, 4] and [G, 4] (pixel xyxy) -> [N, G]; ``inclusive`` adds 1 to sizes."""
    one = 1.0 if inclusive else 0.0
    a, b = a_xyxy[:, None, :], b_xyxy[None, :, :]
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)
    area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
    return inter / np.maximum(area_a + area_b - inter, np.finfo(np.float64).eps)


def _numpy(x: Any, dtype: Any, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    """A tensor / array / list -> numpy array of ``dtype`` (empty inputs get the right shape)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    return arr.reshape(-1, *shape_tail) if arr.size == 0 or shape_tail else arr.reshape(-1)


def _class_arrays(
    detections: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], num_classes: int
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    dets, gts = [], []
    for i, (det, ann) in enumerate(zip(detections, annotations, strict=True)):
        d = {
            "boxes": _numpy(det["boxes"], np.float64, (4,)),
            "scores": _numpy(det["scores"], np.float64),
            "labels": _numpy(det["labels"], np.int64),
        }
        g = {"boxes": _numpy(ann["boxes"], np.float64, (4,)), "labels": _numpy(ann["labels"], np.int64)}
        g["difficult"] = (
            _numpy(ann["difficult"], bool)
            if ann.get("difficult") is not None
            else np.zeros(len(g["labels"]), bool)
        )
        for name, arr in (("detection", d["labels"]), ("annotation", g["labels"])):
            if arr.size and (arr.min() < 1 or arr.max() >= num_classes):
                raise ValueError(
                    f"image {i}: {name} labels must lie in 1..{num_classes - 1}, got {arr.tolist()}"
                )
        dets.append(d)
        gts.append(g)
    return dets, gts


def _candidates(
    dets: list[dict[str, np.ndarray]], gts: list[dict[str, np.ndarray]], label: int, inclusive: bool
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """All detections of one class with their image, score, best IoU and best ground truth index
    (difficult ground truths included), plus each image's ``difficult`` flags for that class."""
    image_of, scores, best_iou, best_gt, gt_difficult = [], [], [], [], []
    for img, (d, g) in enumerate(zip(dets, gts, strict=True)):
        gmask, dmask = g["labels"] == label, d["labels"] == label
        gt_difficult.append(g["difficult"][gmask])
        n = int(dmask.sum())
        image_of.append(np.full(n, img))
        scores.append(d["scores"][dmask])
        if n and gmask.any():
            ious = iou_matrix(d["boxes"][dmask], g["boxes"][gmask], inclusive)
            best_iou.append(ious.max(axis=1))
            best_gt.append(ious.argmax(axis=1))
        else:
            best_iou.append(np.full(n, -np.inf))
            best_gt.append(np.full(n, -1))
    cat = {"image": image_of, "score": scores, "iou": best_iou, "gt": best_gt}
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cat.items()}, gt_difficult


def _greedy_true_positives(
    cand: dict[str, np.ndarray], gt_difficult: list[np.ndarray], iou_threshold: float
) -> np.ndarray:
    """TP flags in descending-score order, ignored (difficult-matched) detections removed."""
    order = np.argsort(-cand["score"], kind="stable")
    images, gt_index = cand["image"][order].tolist(), cand["gt"][order].tolist()
    above = (cand["iou"][order] > iou_threshold).tolist()
    taken = [np.zeros(len(gd), dtype=bool) for gd in gt_difficult]
    tp = []
    for img, j, hit in zip(images, gt_index, above, strict=True):  # sequential: first come, first taken
        if not hit:
            tp.append(False)
        elif not gt_difficult[img][j]:
            tp.append(not taken[img][j])
            taken[img][j] = True
    return np.asarray(tp, dtype=bool)


def evaluate_detections(
    detections: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    inclusive: bool = True,
) -> dict[str, Any]:
    """VOC AP per class and mAP.

    detections[i]: boxes [N, 4] pixel xyxy, scores [N], labels [N] in 1..C-1 (tensors or arrays).
    annotations[i]: boxes [G, 4] pixel xyxy, labels [G] in 1..C-1, difficult [G] bool (optional).
    ``class_names[label - 1]`` names a label. Returns a dict: ``per_class`` {name: AP (NaN when the
    class has no non-difficult ground truth)}, ``mAP`` (mean over the classes with a defined AP; NaN
    if none), ``num_positives`` / ``num_detections`` {name: int}, ``pr_curves`` {name: {"recall",
    "precision"}: arrays in descending-score order}, ``metric`` "voc07" | "voc12", ``iou_threshold``.
    """
    if len(detections) != len(annotations):
        raise ValueError(f"{len(detections)} detection entries for {len(annotations)} annotated images")
    dets, gts = _class_arrays(detections, annotations, len(class_names) + 1)
    per_class: dict[str, float] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    positives: dict[str, int] = {}
    counts: dict[str, int] = {}
    for label, name in enumerate(class_names, start=1):
        cand, gt_difficult = _candidates(dets, gts, label, inclusive)
        npos = int(sum((~gd).sum() for gd in gt_difficult))
        tp = _greedy_true_positives(cand, gt_difficult, iou_threshold)
        ctp, cfp = np.cumsum(tp, dtype=np.float64), np.cumsum(~tp, dtype=np.float64)
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        recall = ctp / npos if npos else np.full_like(ctp, np.nan)
        per_class[name] = voc_ap(recall, precision, use_07_metric) if npos else math.nan
        curves[name] = {"recall": recall, "precision": precision}
        positives[name], counts[name] = npos, int(tp.size)
    defined = [ap for ap in per_class.values() if not math.isnan(ap)]
    return {
        "metric": "voc07" if use_07_metric else "voc12",
        "iou_threshold": iou_threshold,
        "mAP": float(np.mean(defined)) if defined else math.nan,
        "per_class": per_class,
        "num_positives": positives,
        "num_detections": counts,
        "pr_curves": curves,
    }
