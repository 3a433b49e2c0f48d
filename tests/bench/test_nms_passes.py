"""bench.nms_passes: the pass count is what the sync-free mode needs to report convergence."""

from __future__ import annotations

import torch

from bench.nms_passes import passes_needed
from model.postprocess import fixed_pass_nms


def test_pass_count_is_the_smallest_fixed_pass_count_that_converges():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(15, dtype=torch.float32) * 0.02  # a chain: each box overlaps its neighbours
    chain = torch.stack([x, torch.zeros(15), x + 0.05, torch.full((15,), 0.05)], dim=1)
    boxes = torch.stack([chain, torch.rand(15, 4, generator=g).sort(dim=1).values])
    valid = torch.ones(2, 15, dtype=torch.bool)
    n = passes_needed(boxes, valid, 0.3)
    assert n > 3
    assert bool(fixed_pass_nms(boxes, valid, 0.3, n)[1])
    assert not bool(fixed_pass_nms(boxes, valid, 0.3, n - 1)[1])
