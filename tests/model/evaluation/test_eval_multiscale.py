"""Box voting on hand-built clusters, the test-scale schedules, flips and the multi-scale path."""

from __future__ import annotations

import pytest
import torch

from model.evaluation.multiscale import (
    MULTISCALE_320,
    ScaleRule,
    box_voting,
    flip_boxes,
    merge_by_voting,
    multiscale_schedule,
)
from model.evaluation.runner import NetworkDetector, predict_dataset


def test_box_voting_hand_built_clusters():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # leader of cluster A (0.9)
            [1.0, 0.0, 11.0, 10.0],  # IoU 0.82 with the leader: joins A (0.6)
            [50.0, 50.0, 60.0, 60.0],  # alone (0.8)
            [6.0, 0.0, 16.0, 10.0],  # IoU 0.25 with A's leader: its own cluster (0.5)
        ]
    )
    scores = torch.tensor([0.9, 0.6, 0.8, 0.5])
    out_boxes, out_scores = box_voting(boxes, scores)
    expected_a = (0.9 * boxes[0] + 0.6 * boxes[1]) / 1.5  # score-weighted mean: [0.4, 0, 10.4, 10]
    torch.testing.assert_close(out_boxes, torch.stack([expected_a, boxes[2], boxes[3]]))
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.8, 0.5]))  # max score, descending


def test_box_voting_threshold_is_inclusive_and_members_leave():
    boxes = torch.tensor(
        [[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0], [2.0, 0.0, 4.0, 1.0]]
    )  # IoU 0.5 with box 0
    scores = torch.tensor([0.9, 0.3, 0.6])
    out_boxes, out_scores = box_voting(boxes, scores, iou_threshold=0.5)
    assert len(out_scores) == 1 and out_scores.item() == pytest.approx(0.9)
    torch.testing.assert_close(out_boxes[0], (0.9 * boxes[0] + 0.3 * boxes[1] + 0.6 * boxes[2]) / 1.8)
    _, split = box_voting(boxes, scores, iou_threshold=0.51)
    assert len(split) == 3


def test_box_voting_empty():
    b, s = box_voting(torch.zeros(0, 4), torch.zeros(0))
    assert b.shape == (0, 4) and s.shape == (0,)


def test_merge_by_voting_is_per_class():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    runs = [
        {"boxes": box, "scores": torch.tensor([0.7]), "labels": torch.tensor([1])},
        {"boxes": box + 1, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        {"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([2])},
    ]
    merged = merge_by_voting(runs)
    assert merged["labels"].tolist() == [1, 2]  # the class-2 box is not merged into class 1
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8])
    torch.testing.assert_close(merged["boxes"][0], (0.9 * (box[0] + 1) + 0.7 * box[0]) / 1.6)


def test_schedules_follow_the_spec():
    assert [r.size for r in multiscale_schedule(320)] == [320, 192, 384, 448, 512, 576, 704]
    assert [(r.min_longer, r.max_shorter) for r in MULTISCALE_320][1:3] == [(32, None), (None, 160)]
    assert [r.size for r in multiscale_schedule(512)] == [512, 256, 384, 768, 896]
    assert [r.max_shorter for r in multiscale_schedule(512)] == [None, None, None, 192, 128]
    small = multiscale_schedule(64)
    assert [r.size for r in small] == [64, 128] and all(r.size % 64 == 0 for r in small)


def test_scale_rule_size_filters():
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 40.0, 10.0], [0.0, 0.0, 200.0, 200.0]])
    assert ScaleRule(192, min_longer=32).keep(boxes).tolist() == [False, True, True]
    assert ScaleRule(704, max_shorter=32).keep(boxes).tolist() == [True, True, False]
    assert ScaleRule(320).keep(boxes).all()


def test_flip_boxes_mirrors_normalised_x():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(flip_boxes(boxes), torch.tensor([[0.7, 0.2, 0.9, 0.4]]))
    torch.testing.assert_close(flip_boxes(flip_boxes(boxes)), boxes)


def test_flipped_detection_maps_back_to_the_original_image(tiny_model, fake_dataset):
    detector = NetworkDetector(tiny_model)
    image = fake_dataset.load_image(0)
    width = image.shape[-1]
    flipped = detector([image], flip=True)[0]
    on_mirror = detector([image.flip(-1)])[0]
    torch.testing.assert_close(flipped["scores"], on_mirror["scores"])
    mirrored = torch.stack(
        [
            width - on_mirror["boxes"][:, 2],
            on_mirror["boxes"][:, 1],
            width - on_mirror["boxes"][:, 0],
            on_mirror["boxes"][:, 3],
        ],
        dim=1,
    )
    torch.testing.assert_close(flipped["boxes"], mirrored, atol=1e-3, rtol=0)


def test_multiscale_prediction_merges_all_runs(tiny_model, make_dataset):
    fake_dataset = make_dataset(n=1)
    rules = [ScaleRule(64), ScaleRule(128, max_shorter=40)]
    merged = predict_dataset(tiny_model, fake_dataset, batch_size=2, scales=rules, progress=False)
    detector = NetworkDetector(tiny_model)
    for i, result in enumerate(merged):
        image = fake_dataset.load_image(i)
        runs = []
        for rule in rules:
            for flip in (False, True):
                det = detector([image], rule.size, flip)[0]
                runs.append({k: v[rule.keep(det["boxes"])] for k, v in det.items()})
        expected = merge_by_voting(runs)
        torch.testing.assert_close(result["boxes"], expected["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(result["scores"], expected["scores"], atol=1e-5, rtol=0)
        h, w = image.shape[-2:]
        assert (result["boxes"][:, 2] <= w + 1e-3).all() and (result["boxes"][:, 3] <= h + 1e-3).all()
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        assert len(result["scores"]) < sum(len(r["scores"]) for r in runs)  # voting merged something


def test_multiscale_flag_uses_the_schedule(tiny_model, make_dataset, monkeypatch):
    fake_dataset = make_dataset(n=1)
    seen = []
    original = NetworkDetector.__call__

    def spy(self, images, size=None, flip=False):
        seen.append((size, flip))
        return original(self, images, size, flip)

    monkeypatch.setattr(NetworkDetector, "__call__", spy)
    predict_dataset(tiny_model, fake_dataset, batch_size=8, multiscale=True, progress=False)
    assert seen == [(64, False), (64, True), (128, False), (128, True)]
