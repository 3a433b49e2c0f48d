"""Detection data sets (PASCAL VOC, COCO), the training augmentation and batching.

``VOCDetection`` / ``COCODetection`` index their annotations once and yield ``(image uint8 RGB
[3, H, W] or [3, S, S], target)``; ``TrainAugmentation`` / ``EvalTransform`` are their transforms;
``collate`` stacks a batch. pycocotools is imported only when a COCO data set is opened.
"""

from model.data.augment import EvalTransform, TrainAugmentation
from model.data.coco import COCODetection
from model.data.collate import collate
from model.data.records import DatasetWarning, DetectionDataset
from model.data.voc import VOCDetection

__all__ = [
    "COCODetection",
    "DatasetWarning",
    "DetectionDataset",
    "EvalTransform",
    "TrainAugmentation",
    "VOCDetection",
    "collate",
]
