"""Anchor-to-ground-truth matching for the ARM and the ODM (the original code's two-step rule).

1. Greedy bipartite matching: repeatedly the best remaining (gt, anchor) pair with IoU > 0 is fixed,
   so every ground truth owns one distinct anchor whatever its IoU (tiny boxes included).
2. Every other anchor takes its best ground truth if IoU >= ``threshold`` (0.5), else it is
   background. There is no ignore band.

Step 1 is the original Caffe code's bipartite matching. The well-known PyTorch ports instead give each
gt its argmax anchor and let a later gt overwrite an earlier one on a shared anchor, which can leave a
gt with no anchor at all; the greedy assignment here cannot.

Targets, one dict per image: ``{"boxes": Tensor[G, 4] xyxy normalised to [0, 1] (float),
"labels": Tensor[G] int64 in 1..C-1}``; label 0 is background and never appears in a target. G may be 0.

The whole batch is matched at once on padded tensors with a single host sync; only images where two
gts share a best anchor (rare) run the greedy loop, on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from model.box_coding import BoxCoder, cxcywh_to_xyxy, xyxy_to_cxcywh

Target = dict[str, Tensor]
PADDING_IOU = -1.0  # IoU rows of padded (absent) gts: never > 0, never >= threshold


def greedy_bipartite(iou: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy one-to-one assignment on iou: Tensor[G, A] -> (gt_idx [K], anchor_idx [K]), K <= G.

    Pairs are taken best first; pairs with IoU <= 0 are never taken. Runs on the host and re-scores
    only the gts whose best anchor was just taken. ``match_iou`` skips it when no two gts share a
    best anchor, where the answer is simply each gt's argmax.
    """
    device = iou.device
    iou = iou.detach().to("cpu", copy=True)
    best_val, best_anchor = iou.max(dim=1)  # [G]
    gts: list[int] = []
    anchors: list[int] = []
    for _ in range(iou.shape[0]):
        g = int(best_val.argmax())
        if best_val[g] <= 0:
            break
        a = int(best_anchor[g])
        gts.append(g)
        anchors.append(a)
        iou[g] = -1.0
        iou[:, a] = -1.0
        best_val[g] = -1.0
        stale = torch.nonzero((best_anchor == a) & (best_val > 0)).flatten()  # their best just went
        if stale.numel():
            best_val[stale], best_anchor[stale] = iou[stale].max(dim=1)
    pairs = torch.tensor([gts, anchors], dtype=torch.int64, device=device).reshape(2, -1)
    return pairs[0], pairs[1]


def match_iou(iou: Tensor, threshold: float = 0.5) -> Tensor:
    """iou: Tensor[B, G, A] (or [G, A]) -> matched gt index per anchor, Tensor[B, A] (or [A]) int64,
    -1 for background. Rows filled with ``PADDING_IOU`` (-1) stand for absent gts. threshold > 0."""
    if iou.dim() == 2:
        return match_iou(iou.unsqueeze(0), threshold)[0]
    num_images, num_gt, num_anchors = iou.shape
    if num_gt == 0:
        return torch.full((num_images, num_anchors), -1, dtype=torch.int64, device=iou.device)
    best_val, best_gt = iou.max(dim=1)  # [B, A]
    matched = torch.where(best_val >= threshold, best_gt, -1)
    # Step 1, fast path: each gt's argmax anchor, valid wherever no two gts of an image share one.
    gt_val, gt_anchor = iou.max(dim=2)  # [B, G]
    present = gt_val > 0
    counts = torch.zeros_like(matched).scatter_add_(1, gt_anchor, present.long())
    easy = (~present | (counts.gather(1, gt_anchor) == 1)).all(dim=1)  # [B]; IoU-0 gts never match
    write = present & easy[:, None]
    column = torch.where(write, gt_anchor, num_anchors)  # column A is a scratch column
    gt_index = torch.arange(num_gt, device=iou.device).expand(num_images, -1)
    scratch = torch.cat([matched, matched.new_full((num_images, 1), -1)], dim=1)
    matched = scratch.scatter_(1, column, gt_index)[:, :num_anchors]
    for b in torch.nonzero(~easy).flatten().tolist():  # the one host sync
        gts, anchors = greedy_bipartite(iou[b])
        matched[b, anchors] = gts
    return matched


def _match_padded(
    boxes_xyxy: Tensor, labels: Tensor, num_gt: Tensor, priors_xyxy: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """boxes_xyxy: Tensor[B, G, 4] and labels: Tensor[B, G] padded past num_gt: Tensor[B];
    priors_xyxy: Tensor[B, A, 4]. Returns (matched_boxes_xyxy [B, A, 4], matched_labels [B, A])."""
    if boxes_xyxy.shape[1] == 0:  # no gt in the whole batch
        shape = priors_xyxy.shape[:2]
        return priors_xyxy.new_zeros(*shape, 4), torch.zeros(
            shape, dtype=torch.int64, device=priors_xyxy.device
        )
    iou = torch.vmap(box_iou)(boxes_xyxy, priors_xyxy).nan_to_num(0.0)  # NaN: degenerate priors
    present = torch.arange(boxes_xyxy.shape[1], device=iou.device) < num_gt[:, None]  # [B, G]
    matched = match_iou(iou.masked_fill(~present[:, :, None], PADDING_IOU), threshold)
    index = matched.clamp(min=0)
    matched_labels = torch.where(matched >= 0, labels.gather(1, index), 0)
    matched_boxes = boxes_xyxy.gather(1, index[:, :, None].expand(-1, -1, 4))
    return matched_boxes, matched_labels


def match(
    boxes_xyxy: Tensor, labels: Tensor, priors_xyxy: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Match one image's ground truth to its priors.

    boxes_xyxy: Tensor[G, 4], labels: Tensor[G] (1..C-1), priors_xyxy: Tensor[A, 4], all normalised.
    Returns (matched_boxes_xyxy Tensor[A, 4], matched_labels Tensor[A] int64, 0 = background). A
    background anchor's box is arbitrary (a gt, or zeros when G == 0) and must be masked by the caller.
    """
    num_gt = torch.tensor([boxes_xyxy.shape[0]], device=priors_xyxy.device)
    boxes, matched = _match_padded(
        boxes_xyxy[None].to(priors_xyxy), labels[None].long(), num_gt, priors_xyxy[None], threshold
    )
    return boxes[0], matched[0]


def match_batch(
    targets: list[Target],
    priors_cxcywh: Tensor,
    coder: BoxCoder,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Match every image and encode its regression targets relative to its own priors.

    targets: B dicts {"boxes": Tensor[G, 4] xyxy normalised, "labels": Tensor[G] int64 in 1..C-1}.
    priors_cxcywh: Tensor[A, 4] shared by the batch (tiled anchors, for the ARM) or Tensor[B, A, 4]
    per image (the ODM's refined anchors). Returns (loc_targets Tensor[B, A, 4], labels Tensor[B, A]
    int64, 0 = background); loc targets of background anchors are 0. Targets are constants: call it
    under ``torch.no_grad()`` (the loss does).
    """
    num_images = len(targets)
    if priors_cxcywh.dim() == 2:
        priors_cxcywh = priors_cxcywh.expand(num_images, -1, -1)
    if priors_cxcywh.shape[0] != num_images:
        raise ValueError(f"{num_images} targets for {priors_cxcywh.shape[0]} images of priors")
    device, dtype = priors_cxcywh.device, priors_cxcywh.dtype
    boxes = pad_sequence([t["boxes"].to(device=device, dtype=dtype) for t in targets], batch_first=True)
    labels = pad_sequence(
        [t["labels"].to(device=device, dtype=torch.int64) for t in targets], batch_first=True
    )
    num_gt = torch.tensor([t["boxes"].shape[0] for t in targets], device=device)
    matched_boxes, matched_labels = _match_padded(
        boxes, labels, num_gt, cxcywh_to_xyxy(priors_cxcywh), threshold
    )
    loc = coder.encode(xyxy_to_cxcywh(matched_boxes), priors_cxcywh)
    loc = torch.where((matched_labels > 0).unsqueeze(-1), loc, 0.0)
    return loc, matched_labels
