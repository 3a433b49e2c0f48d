import json

import numpy as np
import pytest
from PIL import Image

from model.data import COCODetection, DatasetWarning
from model.errors import UserError

pytest.importorskip("pycocotools")


def write_coco(tmp_path, missing=("c.jpg",)):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images = [
        {"id": 11, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 5, "file_name": "b.jpg", "width": 32, "height": 32},
        {"id": 20, "file_name": "c.jpg", "width": 32, "height": 32},
    ]
    for im in images:
        if im["file_name"] not in missing:
            Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(
                images_dir / im["file_name"]
            )
    categories = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 44, "name": "bottle"}]
    annotations = [
        {"id": 1, "image_id": 11, "category_id": 18, "bbox": [4, 6, 10, 20], "iscrowd": 0, "area": 200},
        {"id": 2, "image_id": 11, "category_id": 44, "bbox": [50, 40, 30, 30], "iscrowd": 0, "area": 900},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1, "area": 3072},
        {"id": 4, "image_id": 11, "category_id": 3, "bbox": [10, 10, 0, 5], "iscrowd": 0, "area": 0},
        {"id": 5, "image_id": 20, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25},
    ]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return images_dir, ann


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    with pytest.warns(DatasetWarning) as record:
        ds = COCODetection(*write_coco(tmp_path))
    assert ds.category_ids == [3, 18, 44] and ds.class_names == ("car", "dog", "bottle")
    for label in (1, 2, 3):
        assert ds.label_of[ds.category_id(label)] == label
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 image files missing (images skipped)" in message and "c.jpg" in message
    assert "1 zero-area boxes (dropped)" in message and "1 boxes reaching outside their image" in message


def test_boxes_are_xyxy_pixels_clipped_and_crowds_left_out(tmp_path):
    with pytest.warns(DatasetWarning):
        ds = COCODetection(*write_coco(tmp_path))
    assert ds.image_ids == [5, 11] and ds.ids == [5, 11]
    empty, a = ds.annotation(0), ds.annotation(1)
    assert empty["boxes"].shape == (0, 4) and empty["image_id"] == "5"
    assert a["boxes"].tolist() == [[4.0, 6.0, 14.0, 26.0], [50.0, 40.0, 64.0, 48.0]]
    assert [ds.category_id(label) for label in a["labels"].tolist()] == [18, 44]
    assert not a["difficult"].any()
    _, target = ds[1]
    assert target["boxes"][1].tolist() == pytest.approx([50 / 64, 40 / 48, 1.0, 1.0])


def test_missing_files_are_clear_errors(tmp_path):
    images_dir, ann = write_coco(tmp_path)
    with pytest.raises(UserError, match=r"COCO annotation file .*nope\.json does not exist"):
        COCODetection(images_dir, tmp_path / "nope.json")
    with pytest.raises(UserError, match=r"COCO images folder .*nope does not exist"):
        COCODetection(tmp_path / "nope", ann)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a COCO instances file"):
        COCODetection(images_dir, tmp_path / "bad.json")
