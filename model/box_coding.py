"""Box formats and the SSD/RefineDet box coder with variances (0.1, 0.2).

Formats are named in every signature: ``cxcywh`` (centre, size) and ``xyxy`` (corners), both in
normalised [0, 1] image coordinates unless a name says pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    cxcy, wh = boxes_cxcywh[..., :2], boxes_cxcywh[..., 2:]
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], dim=-1)


def xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    lo, hi = boxes_xyxy[..., :2], boxes_xyxy[..., 2:]
    return torch.cat([(lo + hi) / 2, hi - lo], dim=-1)


class BoxCoder:
    """Encodes boxes as offsets relative to priors and decodes them back (exact inverses).

    t_xy = (g_cxcy - p_cxcy) / (p_wh * v0),  t_wh = log(g_wh / p_wh) / v1.
    Works on any leading shape: priors broadcast against boxes/deltas ([A, 4] or [B, A, 4]).
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2)) -> None:
        self.variances = variances

    def encode(self, boxes_cxcywh: Tensor, priors_cxcywh: Tensor) -> Tensor:
        v0, v1 = self.variances
        p_xy, p_wh = priors_cxcywh[..., :2], priors_cxcywh[..., 2:]
        t_xy = (boxes_cxcywh[..., :2] - p_xy) / (p_wh * v0)
        t_wh = torch.log(boxes_cxcywh[..., 2:] / p_wh) / v1
        return torch.cat([t_xy, t_wh], dim=-1)

    def decode(self, deltas: Tensor, priors_cxcywh: Tensor) -> Tensor:
        """Deltas [..., 4] -> boxes_cxcywh [..., 4] (not clipped)."""
        v0, v1 = self.variances
        p_xy, p_wh = priors_cxcywh[..., :2], priors_cxcywh[..., 2:]
        xy = p_xy + deltas[..., :2] * v0 * p_wh
        wh = p_wh * torch.exp(deltas[..., 2:] * v1)
        return torch.cat([xy, wh], dim=-1)
