"""COCO metrics through the official pycocotools COCOeval (imported lazily: a ``train`` extra).

Detections (pixel xyxy, labels 1..C-1) become COCO results ``{image_id, category_id, bbox [x, y, w, h],
score}`` with ``category_id = category_ids[label - 1]``. A data set with a ``coco`` ground truth
(``COCODetection``) is scored against it. Any other detection data set (VOC, BCCD) is converted to
a COCO ground truth first: one image per index (id ``index + 1``), category id = label, box areas
w * h, and **difficult objects marked ``iscrowd``**, the only way COCOeval ignores a ground truth
(a detection matched to it is neither TP nor FP; COCOeval computes crowd overlap over the detection's
area). ``AP`` is AP@[.5:.95] (also given as ``mAP``), ``AP50``, ``AP75``, ``APs``/``APm``/``APl`` by area.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def coco_from_annotations(annotations: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> Any:
    """A pycocotools ``COCO`` ground truth built from per-image annotation dicts (boxes [G, 4] pixel
    xyxy, labels [G] 1..C-1, difficult [G], width, height). Image ids are ``index + 1``."""
    from pycocotools.coco import COCO

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, ann in enumerate(annotations):
        images.append(
            {
                "id": i + 1,
                "width": int(ann.get("width", 0)),
                "height": int(ann.get("height", 0)),
                "file_name": str(ann.get("image_id", i)),
            }
        )
        boxes, labels = _array(ann["boxes"]).reshape(-1, 4), _array(ann["labels"]).reshape(-1)
        difficult = (
            _array(ann["difficult"]) if ann.get("difficult") is not None else np.zeros(len(labels), bool)
        )
        for box, label, diff in zip(boxes.tolist(), labels.tolist(), difficult.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(bool(diff)),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(class_names, start=1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_id(dataset: Any, index: int) -> int:
    image_id = dataset.annotation(index)["image_id"]
    if isinstance(image_id, (int, np.integer)) or (isinstance(image_id, str) and image_id.isdigit()):
        return int(image_id)
    raise ValueError(f"COCO image id of index {index} is not an integer: {image_id!r}")


def coco_ground_truth(dataset: Any) -> tuple[Any, list[int], list[int]]:
    """(COCO ground truth, image id per data set index, category id per label - 1) for a data set."""
    coco = getattr(dataset, "coco", None)
    if coco is not None:
        image_ids = getattr(dataset, "image_ids", None) or [
            _image_id(dataset, i) for i in range(len(dataset))
        ]
        return coco, [int(i) for i in image_ids], [int(c) for c in dataset.category_ids]
    annotations = [dataset.annotation(i) for i in range(len(dataset))]
    coco = coco_from_annotations(annotations, dataset.class_names)
    return coco, list(range(1, len(dataset) + 1)), list(range(1, len(dataset.class_names) + 1))


def coco_results(
    detections: Sequence[Mapping[str, Any]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Per-image detections (boxes pixel xyxy, scores, labels 1..C-1) -> COCO result dicts."""
    results = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = _array(det["boxes"]).reshape(-1, 4).tolist()
        for box, score, label in zip(
            boxes, _array(det["scores"]).tolist(), _array(det["labels"]).tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[int(label) - 1]),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                }
            )
    return results


def _per_class(evaluator: Any, category_ids: Sequence[int], class_names: Sequence[str]) -> tuple[dict, dict]:
    """Per-class AP@[.5:.95] and the IoU-0.5 precision-recall curve from COCOeval's accumulate()."""
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M max dets]
    recall_points = np.asarray(evaluator.params.recThrs)
    per_class, curves = {}, {}
    for name, cat in zip(class_names, category_ids, strict=True):
        k = list(evaluator.params.catIds).index(cat)
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        at50 = precision[0, :, k, 0, -1]
        curves[name] = {"recall": recall_points, "precision": np.where(at50 > -1, at50, np.nan)}
    return per_class, curves


def coco_metrics(
    coco_gt: Any,
    results: list[dict[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Run COCOeval (bbox) on ``results`` restricted to ``image_ids``. Returns METRICS, "mAP" (= AP),
    "per_class" AP@[.5:.95] (COCOeval's -1, "no ground truth in that range", becomes NaN), "pr_curves" (IoU 0.5, COCO's 101 recall points) and COCOeval's "summary"
    text. No detections at all gives AP 0 everywhere."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        zeros = dict.fromkeys(METRICS, 0.0)
        return {
            "metric": "coco",
            **zeros,
            "mAP": 0.0,
            "per_class": dict.fromkeys(class_names, 0.0),
            "pr_curves": {},
            "summary": "no detections",
        }
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        log.truncate(0)
        log.seek(0)
        evaluator.summarize()
    stats = {k: float(v) if v >= 0 else math.nan for k, v in zip(METRICS, evaluator.stats[:6], strict=True)}
    per_class, curves = _per_class(evaluator, category_ids, class_names)
    return {
        "metric": "coco",
        **stats,
        "mAP": stats["AP"],
        "per_class": per_class,
        "pr_curves": curves,
        "summary": log.getvalue().rstrip(),
    }


def evaluate_coco_detections(detections: Sequence[Mapping[str, Any]], dataset: Any) -> dict[str, Any]:
    """COCO metrics of per-image detections (``predict_dataset``'s output) on ``dataset``."""
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection entries for {len(dataset)} images")
    coco_gt, image_ids, category_ids = coco_ground_truth(dataset)
    results = coco_results(detections, image_ids, category_ids)
    return coco_metrics(coco_gt, results, image_ids, category_ids, dataset.class_names)
