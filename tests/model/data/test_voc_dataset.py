import warnings

import pytest
import torch
from synthetic_voc import tiny_voc, write_voc

from model.data import DatasetWarning, EvalTransform, TrainAugmentation, VOCDetection
from model.errors import UserError


def one_image(root, objects, size=(80, 60), **kwargs):
    return write_voc(root, {"a": (size, objects)}, {"train": ["a"]}, **kwargs)


def test_missing_root_says_what_to_pass(tmp_path):
    with pytest.raises(UserError, match=r"dataset root .*nowhere does not exist; pass a PASCAL VOC folder"):
        VOCDetection([tmp_path / "nowhere"], "train")


def test_vocdevkit_folder_points_at_the_years(tmp_path):
    tiny_voc(tmp_path / "VOC2007")
    with pytest.raises(UserError, match=r"has no Annotations/ .*holds VOC2007.*--data .*VOC2007"):
        VOCDetection([tmp_path], "train")


def test_missing_split_lists_the_available_ones(tmp_path):
    tiny_voc(tmp_path)
    with pytest.raises(UserError, match=r"split 'tst' not found .*available splits: train, trainval, val"):
        VOCDetection([tmp_path], "tst")


def test_missing_image_file_is_skipped_with_one_summary_warning(tmp_path):
    objects = [("cat", (10, 10, 30, 30), False)]
    images = {i: ((64, 48), objects) for i in ("a", "b", "c")}
    write_voc(tmp_path, images, {"train": ["a", "b", "c", "ghost"]}, without_image_file=["b"])
    with pytest.warns(DatasetWarning) as record:
        ds = VOCDetection([tmp_path], "train")
    assert len(record) == 1
    message = str(record[0].message)
    assert "1 image files missing (images skipped), e.g." in message and "b.jpg" in message
    assert "1 annotation files missing (images skipped)" in message and "ghost.xml" in message
    assert ds.ids == ["a", "c"]
    assert [ds[i][1]["image_id"] for i in range(len(ds))] == ["a", "c"]  # a whole pass, no crash


def test_boxes_outside_the_image_are_clipped(tmp_path):
    one_image(tmp_path, [("cat", (-5, 3, 100, 40), False), ("cat", (2, 2, 20, 20), False)])
    with pytest.warns(
        DatasetWarning, match=r"1 boxes reaching outside their image \(clipped to it\), e.g. a"
    ):
        ds = VOCDetection([tmp_path], "train")
    boxes = ds.annotation(0)["boxes"]
    # 1-based VOC -> 0-based pixels, clipped to [0, W-1] x [0, H-1]
    assert boxes.tolist() == [[0.0, 2.0, 79.0, 39.0], [1.0, 1.0, 19.0, 19.0]]
    _, target = ds[0]
    assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1


def test_zero_area_boxes_are_dropped(tmp_path):
    objects = [
        ("cat", (30, 20, 30, 20), False),
        ("dog", (40, 10, 35, 30), False),
        ("cat", (5, 5, 25, 25), False),
    ]
    one_image(tmp_path, objects)
    with pytest.warns(DatasetWarning, match=r"2 zero-area boxes \(dropped\), e.g. a") as record:
        ds = VOCDetection([tmp_path], "train")
    assert len(record) == 1
    ann = ds.annotation(0)
    assert ann["boxes"].tolist() == [[4.0, 4.0, 24.0, 24.0]]
    assert ann["labels"].tolist() == [ds.class_names.index("cat") + 1]


def test_image_without_objects_is_kept_silently(tmp_path):
    write_voc(
        tmp_path,
        {"a": ((64, 48), []), "b": ((64, 48), [("cat", (5, 5, 20, 20), False)])},
        {"train": ["a", "b"]},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = VOCDetection([tmp_path], "train")
    assert len(ds) == 2 and ds.problems.counts["no_objects"] == 1
    for transform in (None, EvalTransform(64), TrainAugmentation(64)):
        image, target = ds.sample(0, transform)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert image.dtype == torch.uint8


def test_classes_from_data_are_sorted_or_as_given(tmp_path):
    one_image(
        tmp_path,
        [("zebra", (1, 1, 9, 9), False), ("ant", (2, 2, 9, 9), False), ("moth", (3, 3, 9, 9), False)],
    )
    assert VOCDetection([tmp_path], "train").class_names == ("ant", "moth", "zebra")
    with pytest.warns(DatasetWarning, match=r"1 objects of classes not in class_names \(ignored\)"):
        ds = VOCDetection([tmp_path], "train", class_names=("zebra", "ant"))
    assert ds.class_names == ("zebra", "ant")
    assert ds.annotation(0)["labels"].tolist() == [1, 2]


def test_no_objects_and_no_class_list_is_a_clear_error(tmp_path):
    one_image(tmp_path, [])
    with pytest.raises(UserError, match="pass the class names"):
        VOCDetection([tmp_path], "train")


def test_difficult_flag_is_kept_or_dropped(tmp_path):
    one_image(tmp_path, [("cat", (1, 1, 20, 20), True), ("cat", (30, 30, 50, 50), False)])
    ds = VOCDetection([tmp_path], "train")
    assert ds.annotation(0)["difficult"].tolist() == [True, False]
    assert ds[0][1]["difficult"].tolist() == [True, False]
    easy = VOCDetection([tmp_path], "train", keep_difficult=False)
    assert easy.annotation(0)["boxes"].tolist() == [[29.0, 29.0, 49.0, 49.0]]


def test_item_without_transform_normalises_by_the_image_size(tmp_path):
    one_image(tmp_path, [("cat", (9, 13, 41, 25), False)], size=(80, 60))
    image, target = VOCDetection([tmp_path], "train")[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.uint8
    assert torch.allclose(target["boxes"], torch.tensor([[8 / 80, 12 / 60, 40 / 80, 24 / 60]]))
    assert target["orig_size"] == (60, 80) and target["image_id"] == "a"


def test_several_roots_are_joined_with_prefixed_ids(tmp_path):
    tiny_voc(tmp_path / "VOC2007", num_images=3)
    tiny_voc(tmp_path / "VOC2012", num_images=4)
    ds = VOCDetection([tmp_path / "VOC2007", tmp_path / "VOC2012"], "trainval")
    assert len(ds) == 7 and ds.ids[0] == "VOC2007/img000" and ds.ids[-1] == "VOC2012/img003"
    assert ds.class_names == ("cat", "dog")


def test_undecodable_image_is_replaced_not_fatal(tmp_path):
    tiny_voc(tmp_path, num_images=3)
    (tmp_path / "JPEGImages" / "img001.jpg").write_bytes(b"not a jpeg")
    ds = VOCDetection([tmp_path], "trainval")
    with pytest.warns(DatasetWarning, match="cannot decode .*img001.jpg"):
        _, target = ds[1]
    assert target["image_id"] == "img002"


def test_bccd(bccd):
    with pytest.warns(DatasetWarning) as record:
        ds = VOCDetection([bccd], "trainval")
    assert len(record) == 1 and "2 zero-area boxes (dropped)" in str(record[0].message)
    assert len(ds) == 292 and ds.class_names == ("Platelets", "RBC", "WBC")
    ann = ds.annotation(0)
    assert ann["width"] == 640 and ann["height"] == 480
    assert ann["boxes"][:, 2].max() <= 639 and ann["boxes"][:, 3].max() <= 479
