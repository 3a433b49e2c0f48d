"""Anchor (prior box) generation, computed once per config.

Order (the original code's): levels conv4_3 -> conv6_2; cells row-major (y outer, x inner); within a
cell the 1:1 anchor, then for each ratio r the wide (w = s*sqrt(r), h = s/sqrt(r)) and tall anchor.
No extra sqrt(min*max) square anchor, no clipping. Centres ((x + offset) * step) / input_size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.config import RefineDetConfig


def generate_anchors(config: RefineDetConfig) -> Tensor:
    """Anchors for ``config`` as priors_cxcywh: Tensor[A, 4], normalised to [0, 1] by the input size."""
    spec = config.anchors
    size = float(config.input_size)
    per_level = []
    for step, fmap, anchor_size in zip(spec.steps, config.feature_map_sizes, spec.sizes, strict=True):
        s = anchor_size / size
        shapes = [(s, s)]  # (w, h) per cell, in order: 1:1, then wide/tall per ratio
        for r in spec.aspect_ratios:
            shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        centres = (torch.arange(fmap, dtype=torch.float64) + spec.offset) * step / size
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # y outer, x inner
        wh = torch.tensor(shapes, dtype=torch.float64)  # [K, 2]
        k = wh.shape[0]
        level = torch.empty(fmap, fmap, k, 4, dtype=torch.float64)
        level[..., 0] = cx[..., None]
        level[..., 1] = cy[..., None]
        level[..., 2:] = wh
        per_level.append(level.reshape(-1, 4))
    anchors = torch.cat(per_level).to(torch.float32)
    if anchors.shape[0] != config.num_anchors:  # one source of truth: the config's count
        raise AssertionError(f"generated {anchors.shape[0]} anchors, config says {config.num_anchors}")
    return anchors
