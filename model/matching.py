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
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from model.box_coding import BoxCoder, cxcywh_to_xyxy, xyxy_to_cxcywh

Target = dict[str, Tensor]


def greedy_bipartite(iou: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy one-to-one assignment on iou: Tensor[G, A] -> (gt_idx [K], anchor_idx [K]), K <= G.

    Pairs are taken best first; pairs with IoU <= 0 are never taken. When every gt's best anchor is
    distinct (the usual case) the result is each gt's argmax, found with one host sync; otherwise a
    loop over G re-scores only the gts whose best anchor was just taken.
    """
    num_gt, device = iou.shape[0], iou.device
    best_val, best_anchor = iou.max(dim=1)  # [G]
    counts = torch.zeros(iou.shape[1], dtype=torch.int64, device=device)
    counts.index_add_(0, best_anchor, torch.ones_like(best_anchor))
    if bool(((best_val > 0) & (counts[best_anchor] == 1)).all()):
        return torch.arange(num_gt, device=device), best_anchor
    iou = iou.detach().to("cpu", copy=True)  # conflicts are rare: resolve them on the host
    best_val, best_anchor = best_val.cpu(), best_anchor.cpu()
    gts: list[int] = []
    anchors: list[int] = []
    for _ in range(num_gt):
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
    """iou: Tensor[G, A] -> matched gt index per anchor, Tensor[A] int64, -1 for background."""
    num_anchors = iou.shape[1]
    if iou.shape[0] == 0:
        return torch.full((num_anchors,), -1, dtype=torch.int64, device=iou.device)
    iou = iou.nan_to_num(0.0)  # degenerate (inf/zero-size) refined anchors match nothing
    best_val, best_gt = iou.max(dim=0)  # [A]
    matched = torch.where(best_val >= threshold, best_gt, -1)
    gt_idx, anchor_idx = greedy_bipartite(iou)
    matched[anchor_idx] = gt_idx  # the bipartite pairs win over the threshold rule
    return matched


def match(
    boxes_xyxy: Tensor, labels: Tensor, priors_xyxy: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Match one image's ground truth to its priors.

    boxes_xyxy: Tensor[G, 4], labels: Tensor[G] (1..C-1), priors_xyxy: Tensor[A, 4], all normalised.
    Returns (matched_boxes_xyxy Tensor[A, 4], matched_labels Tensor[A] int64, 0 = background). A
    background anchor's box is an arbitrary gt (zeros when G == 0) and must be masked by the caller.
    """
    num_anchors = priors_xyxy.shape[0]
    if boxes_xyxy.shape[0] == 0:
        zeros = priors_xyxy.new_zeros(num_anchors, 4)
        return zeros, torch.zeros(num_anchors, dtype=torch.int64, device=priors_xyxy.device)
    matched = match_iou(box_iou(boxes_xyxy, priors_xyxy), threshold)
    positive = matched >= 0
    index = matched.clamp(min=0)
    matched_labels = torch.where(positive, labels[index], 0)
    return boxes_xyxy[index], matched_labels


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
    boxes, labels = [], []
    for target, priors in zip(targets, priors_cxcywh, strict=True):
        gt_boxes = target["boxes"].to(device=device, dtype=dtype)
        gt_labels = target["labels"].to(device=device, dtype=torch.int64)
        matched_boxes, matched_labels = match(gt_boxes, gt_labels, cxcywh_to_xyxy(priors), threshold)
        boxes.append(matched_boxes)
        labels.append(matched_labels)
    labels_t = torch.stack(labels)
    loc = coder.encode(xyxy_to_cxcywh(torch.stack(boxes)), priors_cxcywh)
    loc = torch.where((labels_t > 0).unsqueeze(-1), loc, 0.0)
    return loc, labels_t
