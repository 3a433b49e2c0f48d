"""Greedy bipartite + threshold matching, and batched matching with per-image priors."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from model.box_coding import BoxCoder, cxcywh_to_xyxy, xyxy_to_cxcywh
from model.matching import greedy_bipartite, match, match_batch, match_iou


def reference_greedy(iou: torch.Tensor) -> dict[int, int]:
    """The textbook O(G^2 A) greedy: repeatedly take the best remaining pair with IoU > 0."""
    iou = iou.clone()
    pairs: dict[int, int] = {}
    for _ in range(iou.shape[0]):
        flat = int(iou.argmax())
        g, a = divmod(flat, iou.shape[1])
        if iou[g, a] <= 0:
            break
        pairs[g] = a
        iou[g] = -1
        iou[:, a] = -1
    return pairs


def test_two_gts_with_the_same_best_anchor_get_distinct_anchors() -> None:
    priors = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 1.0, 1.0]])
    # both gts overlap prior 0 best; gt listed first has the lower IoU so order cannot save it
    boxes = torch.tensor([[0.0, 0.0, 0.35, 0.35], [0.0, 0.0, 0.4, 0.4]])
    labels = torch.tensor([2, 1])
    iou = box_iou(boxes, priors)
    assert iou[:, 0].gt(iou[:, 1]).all()  # prior 0 is the best anchor of both
    matched_boxes, matched_labels = match(boxes, labels, priors)
    assert matched_labels.tolist() == [1, 2, 0]  # gt 1 (IoU 1) takes prior 0, gt 0 falls to prior 1
    torch.testing.assert_close(matched_boxes[:2], boxes.flip(0))


def test_tiny_gt_below_threshold_still_gets_its_best_anchor() -> None:
    priors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]])
    boxes = torch.tensor([[0.55, 0.55, 0.6, 0.6]])  # IoU 0.01 with prior 1, 0 with the others
    assert box_iou(boxes, priors).max() < 0.5
    _, labels = match(boxes, torch.tensor([3]), priors)
    assert labels.tolist() == [0, 3, 0]


def test_threshold_is_inclusive_and_other_anchors_take_their_best_gt() -> None:
    priors = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1]]
    )
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    # prior 0 has IoU exactly 0.5 with both gts -> positive, takes the first best; prior 3 IoU 0.02 -> 0
    _, labels = match(boxes, torch.tensor([1, 2]), priors, threshold=0.5)
    assert labels.tolist() == [1, 1, 2, 0]
    _, labels = match(boxes, torch.tensor([1, 2]), priors, threshold=0.51)
    assert labels.tolist() == [0, 1, 2, 0]


def reference_match(
    boxes_xyxy: torch.Tensor, labels: torch.Tensor, priors_xyxy: torch.Tensor
) -> torch.Tensor:
    """Per-anchor labels from the textbook rule, one image, no vectorisation."""
    out = torch.zeros(priors_xyxy.shape[0], dtype=torch.int64)
    if boxes_xyxy.shape[0] == 0:
        return out
    iou = box_iou(boxes_xyxy, priors_xyxy)
    best_val, best_gt = iou.max(dim=0)
    out[best_val >= 0.5] = labels[best_gt[best_val >= 0.5]]
    for g, a in reference_greedy(iou).items():
        out[a] = labels[g]
    return out


def crowded_image(g: torch.Generator, num_gt: int) -> dict[str, torch.Tensor]:
    xy = torch.rand(num_gt, 2, generator=g) * 0.3
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(num_gt, 2, generator=g) * 0.3], dim=1)
    return {"boxes": boxes, "labels": torch.randint(1, 6, (num_gt,), generator=g)}


def test_batched_matching_equals_the_per_image_reference() -> None:
    """One batch mixing conflict-free, crowded (host greedy path), single-gt and empty images, with
    per-image priors: the padded batch code must agree with the plain rule image by image."""
    g = torch.Generator().manual_seed(7)
    coder = BoxCoder((0.1, 0.2))
    targets = [crowded_image(g, n) for n in (9, 1, 0, 14, 3)]
    sparse = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.7, 0.7, 0.9, 0.8]])
    targets[4] = {"boxes": sparse, "labels": torch.tensor([2, 5])}
    cxcy = torch.rand(5, 300, 2, generator=g) * 0.7
    priors = torch.cat([cxcy, 0.02 + torch.rand(5, 300, 2, generator=g) * 0.3], dim=-1)
    conflicts = [
        box_iou(t["boxes"], cxcywh_to_xyxy(p)).argmax(1).unique().numel() < len(t["boxes"])
        for t, p in zip(targets, priors, strict=True)
    ]
    assert any(conflicts) and not conflicts[4]  # both paths run in one batch
    loc, labels = match_batch(targets, priors, coder)
    for b, (t, p) in enumerate(zip(targets, priors, strict=True)):
        assert labels[b].tolist() == reference_match(t["boxes"], t["labels"], cxcywh_to_xyxy(p)).tolist(), b
    # every positive's target decodes back onto some gt box of its image
    decoded = cxcywh_to_xyxy(coder.decode(loc, priors))
    for b, t in enumerate(targets):
        pos = labels[b] > 0
        if pos.any():
            assert box_iou(decoded[b][pos], t["boxes"]).max(dim=1).values.min() > 1 - 1e-4


def test_bipartite_pair_overrides_the_anchors_best_gt() -> None:
    # anchor 0's best gt is gt 0 (0.6), but gt 1 has no other anchor: greedy takes (0, a1) 0.8 first,
    # then (1, a0) 0.55, so anchor 0 belongs to gt 1 even though gt 0 overlaps it more
    iou = torch.tensor([[0.6, 0.8, 0.0], [0.55, 0.0, 0.0]])
    assert match_iou(iou, 0.5).tolist() == [1, 0, -1]


def test_gt_without_any_overlap_is_left_unmatched_not_crashing() -> None:
    iou = torch.tensor([[0.9, 0.0], [0.0, 0.0]])
    gts, anchors = greedy_bipartite(iou)
    assert gts.tolist() == [0] and anchors.tolist() == [0]
    assert match_iou(iou).tolist() == [0, -1]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_matches_the_reference_on_crowded_scenes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # 12 gts crowded in one corner, 60 priors: many gts share a best anchor
    xy = torch.rand(12, 2, generator=g) * 0.2
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(12, 2, generator=g) * 0.2], dim=1)
    pxy = torch.rand(60, 2, generator=g) * 0.25
    priors = torch.cat([pxy, pxy + 0.05 + torch.rand(60, 2, generator=g) * 0.3], dim=1)
    iou = box_iou(boxes, priors)
    assert iou.argmax(dim=1).unique().numel() < 12  # the conflict path is exercised
    gts, anchors = greedy_bipartite(iou)
    assert dict(zip(gts.tolist(), anchors.tolist(), strict=True)) == reference_greedy(iou)
    assert anchors.unique().numel() == anchors.numel() == 12
    matched = match_iou(iou)
    assert set(matched.tolist()) >= set(range(12))  # every gt owns at least one anchor


def test_no_ground_truth_is_all_background() -> None:
    priors = torch.rand(7, 4, generator=torch.Generator().manual_seed(0)).sort(dim=1).values  # valid xyxy
    boxes, labels = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), priors)
    assert boxes.shape == (7, 4) and labels.shape == (7,)
    assert labels.eq(0).all()
    assert match_iou(torch.zeros(0, 7)).eq(-1).all()


def test_match_batch_with_shared_and_per_image_priors() -> None:
    coder = BoxCoder((0.1, 0.2))
    priors_cxcywh = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 0.45, 0.5]]), "labels": torch.tensor([4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    loc, labels = match_batch(targets, priors_cxcywh, coder)
    assert loc.shape == (2, 3, 4) and labels.shape == (2, 3)
    assert labels.tolist() == [[4, 0, 0], [0, 0, 0]]
    expected = coder.encode(xyxy_to_cxcywh(targets[0]["boxes"]), priors_cxcywh[0])
    torch.testing.assert_close(loc[0, 0], expected[0])
    assert loc[0, 1:].eq(0).all() and loc[1].eq(0).all()  # background targets are zeroed

    # per-image (refined) priors: image 0's prior 1 is moved onto the gt, so it matches and its
    # target is encoded relative to the refined prior, not the tiled one
    refined = priors_cxcywh.expand(2, -1, -1).clone()
    refined[0, 1] = torch.tensor([0.2, 0.25, 0.4, 0.5])
    loc, labels = match_batch(targets, refined, coder)
    assert labels[0].tolist() == [4, 4, 0]
    gt = xyxy_to_cxcywh(targets[0]["boxes"])[0]
    torch.testing.assert_close(loc[0, 1], coder.encode(gt, refined[0, 1]))
    torch.testing.assert_close(coder.decode(loc[0, 1], refined[0, 1]), gt)
    assert torch.allclose(
        cxcywh_to_xyxy(coder.decode(loc[0, 0], refined[0, 0])), targets[0]["boxes"][0], atol=1e-6
    )


def test_match_batch_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="targets"):
        match_batch([], torch.rand(2, 3, 4), BoxCoder())
