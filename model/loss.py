"""RefineDet's multi-task loss: ARM (object / background) + ODM (C classes), weight 1 each.

Each module: softmax cross-entropy over its positives and hard-mined negatives plus smooth L1
(beta 1, summed) on its positives, divided by the module's own positive count over the batch,
max(1, N). A module with no positives in the batch contributes exactly 0.

- ARM matches against the tiled anchors, labels collapsed to object / background.
- ODM matches against the refined anchors decode(arm_loc, anchors) (detached, not clipped) and
  encodes its targets relative to them; ``Ablation.cascade=False`` uses the tiled anchors instead.
  Nothing in the ODM loss back-propagates into the ARM outputs.
- Hard negative mining per image: negatives ranked by background cross-entropy, -log p_bg; keep
  ``negative_ratio`` x positives of that image (capped at the negatives available).
- Negative anchor filtering (``Ablation.negative_filtering``): anchors whose ARM background
  probability exceeds theta (0.99) are never ODM negatives. Paper vs original code: the paper says
  such anchors are discarded from the ODM; the original Caffe code (and ``LossConfig.negative_filter
  = "code"``, the default) still trains them as positives when they match. ``"paper"`` drops them
  from the ODM loss entirely, positives included (and from its positive count).

All losses are computed in float32 (the logits are cast), so the module is safe under autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.box_coding import BoxCoder
from model.config import RefineDetConfig
from model.matching import Target, match_batch
from model.network import RefineDetOutput


class ModuleLoss(NamedTuple):
    loc: Tensor  # scalar, normalised by max(1, num_pos)
    conf: Tensor  # scalar, normalised by max(1, num_pos)
    num_pos: Tensor  # scalar int64, positives over the batch


@torch.no_grad()
def hard_negative_mask(
    bg_loss: Tensor, positives: Tensor, negative_ratio: int, eligible: Tensor | None = None
) -> Tensor:
    """Per image, the ``negative_ratio * P`` highest-``bg_loss`` eligible non-positive anchors.

    bg_loss: Tensor[B, A] (-log p_bg), positives: Tensor[B, A] bool, eligible: Tensor[B, A] bool or
    None (all eligible). Returns Tensor[B, A] bool; the count per image is min(ratio * P, available).
    """
    candidates = ~positives if eligible is None else eligible & ~positives
    ranked = bg_loss.float().masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # rank[b, a]: position of anchor a in image b's ordering
    num_pos = positives.sum(dim=1, keepdim=True)
    num_neg = torch.minimum(negative_ratio * num_pos, candidates.sum(dim=1, keepdim=True))
    return (rank < num_neg) & candidates


def multibox_loss(
    loc: Tensor,
    conf: Tensor,
    loc_targets: Tensor,
    labels: Tensor,
    negative_ratio: int,
    keep: Tensor | None = None,
    eligible_negatives: Tensor | None = None,
) -> ModuleLoss:
    """One module's loss. loc: Tensor[B, A, 4], conf: Tensor[B, A, K] logits (float32),
    loc_targets: Tensor[B, A, 4], labels: Tensor[B, A] int64 (0 = background).

    keep: Tensor[B, A] bool, anchors allowed to be positives (None: all); eligible_negatives:
    Tensor[B, A] bool, anchors allowed to be mined as negatives (None: all).
    """
    log_p = conf.log_softmax(dim=-1)
    positives = labels > 0
    if keep is not None:
        positives = positives & keep
    negatives = hard_negative_mask(-log_p[..., 0].detach(), positives, negative_ratio, eligible_negatives)
    num_pos = positives.sum()
    norm = num_pos.clamp(min=1).to(log_p.dtype)
    ce = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, A]
    conf_loss = torch.where(positives | negatives, ce, 0.0).sum() / norm
    l1 = F.smooth_l1_loss(loc, loc_targets, beta=1.0, reduction="none").sum(dim=-1)  # [B, A]
    loc_loss = torch.where(positives, l1, 0.0).sum() / norm
    return ModuleLoss(loc_loss, conf_loss, num_pos)


class RefineDetLoss(nn.Module):
    """``forward(outputs, anchors_cxcywh [A, 4], targets) -> dict`` of scalar tensors: ``loss``
    (total), ``arm_loc``, ``arm_conf``, ``odm_loc``, ``odm_conf``, ``arm_num_pos``, ``odm_num_pos``.

    targets: one dict per image, {"boxes": Tensor[G, 4] xyxy normalised, "labels": Tensor[G] int64
    in 1..C-1} (see ``model.matching``).
    """

    def __init__(self, config: RefineDetConfig) -> None:
        super().__init__()
        self.config = config
        self.coder = BoxCoder(config.anchors.variances)

    def forward(
        self, outputs: RefineDetOutput, anchors_cxcywh: Tensor, targets: list[Target]
    ) -> dict[str, Tensor]:
        arm_loc, arm_conf, odm_loc, odm_conf = (t.float() for t in outputs)
        if len(targets) != arm_loc.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {arm_loc.shape[0]} images")
        cfg = self.config.loss
        anchors = anchors_cxcywh.float()
        with torch.no_grad():
            arm_loc_t, labels = match_batch(targets, anchors, self.coder, cfg.match_threshold)
            odm_priors = (
                self.coder.decode(arm_loc.detach(), anchors) if self.config.ablation.cascade else anchors
            )
            odm_loc_t, odm_labels = match_batch(targets, odm_priors, self.coder, cfg.match_threshold)
            keep, eligible = self.negative_filter(arm_conf.detach())
        arm = multibox_loss(arm_loc, arm_conf, arm_loc_t, (labels > 0).long(), cfg.negative_ratio)
        odm = multibox_loss(odm_loc, odm_conf, odm_loc_t, odm_labels, cfg.negative_ratio, keep, eligible)
        return {
            "loss": arm.loc + arm.conf + odm.loc + odm.conf,
            "arm_loc": arm.loc,
            "arm_conf": arm.conf,
            "odm_loc": odm.loc,
            "odm_conf": odm.conf,
            "arm_num_pos": arm.num_pos,
            "odm_num_pos": odm.num_pos,
        }

    def negative_filter(self, arm_conf: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """arm_conf: Tensor[B, A, 2] logits -> (keep, eligible_negatives) masks Tensor[B, A] for the
        ODM, or None where the filter does not apply. An anchor is "easy" when p_bg > theta."""
        if not self.config.ablation.negative_filtering:
            return None, None
        hard = arm_conf.float().softmax(dim=-1)[..., 0] <= self.config.filter_threshold
        keep = hard if self.config.loss.negative_filter == "paper" else None
        return keep, hard
