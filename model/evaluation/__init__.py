"""Evaluation (VOC07/VOC12 AP, COCO AP via COCOeval, the multi-scale + flip test) and file prediction.

- ``voc``: ``voc_ap``, ``evaluate_detections`` (pure numpy, devkit semantics).
- ``coco``: COCOeval glue (ground truth from a ``COCODetection`` or converted from any data set).
- ``multiscale``: the paper's test scales and box voting.
- ``runner``: ``predict_dataset``, ``evaluate_voc``, ``evaluate_coco`` (the one inference path).
- ``report``: terminal table, JSON results, precision-recall PNGs. ``predict``: detection on files.
- ``cli``: ``refinedet eval`` / ``refinedet predict``.

Names are imported lazily so that ``refinedet`` registers its commands without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "voc_ap": "model.evaluation.voc",
    "evaluate_detections": "model.evaluation.voc",
    "predict_dataset": "model.evaluation.runner",
    "evaluate_voc": "model.evaluation.runner",
    "evaluate_coco": "model.evaluation.runner",
    "box_voting": "model.evaluation.multiscale",
    "multiscale_schedule": "model.evaluation.multiscale",
    "predict_files": "model.evaluation.predict",
    "ImagePredictor": "model.evaluation.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
