"""COCO metrics go through pycocotools' COCOeval, on a tiny synthetic COCO data set."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("pycocotools", reason="pycocotools (the train extra) runs COCOeval")

from model.evaluation.coco import coco_from_annotations, coco_results, evaluate_coco_detections
from model.evaluation.runner import evaluate_coco

# image id -> (width, height, [(category id, [x, y, w, h])]); category ids are not 1..C on purpose
IMAGES = {
    10: (200, 150, [(3, [10, 10, 50, 40]), (7, [100, 50, 80, 90])]),
    20: (160, 120, [(3, [5, 60, 20, 20]), (3, [60, 10, 90, 100])]),
}
CATEGORIES = {3: "cat", 7: "dog"}


class FakeCOCODataset:
    """The ``COCODetection`` interface: class_names, category_ids, coco, annotation(i) (xyxy pixels)."""

    def __init__(self, path):
        from pycocotools.coco import COCO

        data = {
            "images": [
                {"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h, _) in IMAGES.items()
            ],
            "annotations": [
                {
                    "id": 100 * i + k,
                    "image_id": i,
                    "category_id": c,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": 0,
                }
                for i, (_, _, objs) in IMAGES.items()
                for k, (c, b) in enumerate(objs)
            ],
            "categories": [{"id": c, "name": n} for c, n in CATEGORIES.items()],
        }
        path.write_text(json.dumps(data))
        self.coco = COCO(str(path))
        self.category_ids = list(CATEGORIES)
        self.class_names = tuple(CATEGORIES.values())
        self.ids = list(IMAGES)

    def __len__(self):
        return len(self.ids)

    def annotation(self, index):
        w, h, objs = IMAGES[self.ids[index]]
        boxes = torch.tensor([[x, y, x + bw, y + bh] for _, (x, y, bw, bh) in objs], dtype=torch.float32)
        labels = torch.tensor([self.category_ids.index(c) + 1 for c, _ in objs])
        return {
            "boxes": boxes,
            "labels": labels,
            "difficult": torch.zeros(len(objs), dtype=torch.bool),
            "image_id": str(self.ids[index]),
            "width": w,
            "height": h,
        }

    def load_image(self, index):
        w, h, _ = IMAGES[self.ids[index]]
        return torch.zeros(3, h, w, dtype=torch.uint8)


@pytest.fixture
def coco_dataset(tmp_path):
    return FakeCOCODataset(tmp_path / "instances.json")


def perfect_detections(dataset, shift=0.0):
    dets = []
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        boxes = ann["boxes"].clone()
        boxes[:1, 0::2] += shift  # move the first box of each image sideways
        dets.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(boxes)), "labels": ann["labels"]})
    return dets


def test_perfect_detections_give_ap_one(coco_dataset):
    result = evaluate_coco_detections(perfect_detections(coco_dataset), coco_dataset)
    for key in ("AP", "AP50", "AP75", "mAP"):
        assert result[key] == pytest.approx(1.0)
    assert result["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0})
    assert "Average Precision" in result["summary"]  # COCOeval.summarize() ran


def test_shifted_box_lowers_ap(coco_dataset):
    perfect = evaluate_coco_detections(perfect_detections(coco_dataset), coco_dataset)
    shifted = evaluate_coco_detections(perfect_detections(coco_dataset, shift=12.0), coco_dataset)
    assert shifted["AP"] < perfect["AP"] - 0.05
    assert shifted["AP75"] < 1.0


def test_results_map_labels_to_category_ids_and_xywh():
    dets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2]),
        }
    ]
    (res,) = coco_results(dets, [42], [3, 7])
    assert res == {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}


def test_no_detections_give_zero_ap(coco_dataset):
    empty = [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ] * 2
    assert evaluate_coco_detections(empty, coco_dataset)["AP"] == 0.0


class VOCLike:
    """No ``coco`` attribute: the ground truth is converted; difficult objects become crowd regions."""

    class_names = ("x", "y")

    def __init__(self):
        self.anns = [
            {
                "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0]]),
                "labels": torch.tensor([1, 2]),
                "difficult": torch.tensor([False, True]),
                "image_id": "a",
                "width": 100,
                "height": 100,
            },
        ]

    def __len__(self):
        return 1

    def annotation(self, i):
        return self.anns[i]


def test_converted_ground_truth_ignores_difficult():
    ds = VOCLike()
    coco = coco_from_annotations([ds.annotation(0)], ds.class_names)
    assert [a["iscrowd"] for a in coco.dataset["annotations"]] == [0, 1]
    hit = {
        "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 90.0, 90.0]]),
        "scores": torch.tensor([0.9, 0.95]),
        "labels": torch.tensor([1, 2]),
    }
    result = evaluate_coco_detections([hit], ds)
    assert result["per_class"]["x"] == pytest.approx(1.0)
    assert math.isnan(result["per_class"]["y"])  # only a difficult (crowd) object: no positives
    assert result["AP"] == pytest.approx(1.0)  # the detection on the difficult object is no false positive
    miss = {k: torch.cat([v, v[:1]]) for k, v in hit.items()}
    miss["boxes"][-1] = torch.tensor([60.0, 0.0, 99.0, 40.0])
    miss["scores"][-1] = 0.99  # a higher-scoring false positive of class x
    assert evaluate_coco_detections([miss], ds)["AP"] < 0.9


def test_evaluate_coco_runs_the_model(tiny_model, fake_dataset):
    result = evaluate_coco(tiny_model, fake_dataset, batch_size=2, progress=False)
    assert result["num_images"] == len(fake_dataset)
    assert set(result) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class", "summary"}
    assert 0.0 <= result["AP"] <= 1.0
