"""The learning-rate schedule: multi-step x0.1 with an optional linear warm-up, stepped per iteration.

The paper's VOC07+12 schedule drops the lr at 80k and 100k of 120k iterations; ``default_steps``
scales those fractions (2/3, 5/6) to the run's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.training.options import PAPER_ITERATIONS, PAPER_STEPS


def default_steps(iterations: int) -> tuple[int, ...]:
    """The paper's milestones scaled to ``iterations`` (120k -> 80k, 100k)."""
    return tuple(max(1, round(iterations * s / PAPER_ITERATIONS)) for s in PAPER_STEPS)


class MultiStepWarmup:
    """lr factor at iteration ``it`` (0-based): ``gamma ** (milestones passed)``, times a linear ramp
    ``(it + 1) / warmup`` during the first ``warmup`` iterations. A plain object so that
    ``LambdaLR.state_dict`` stores it."""

    def __init__(self, milestones: Sequence[int], warmup: int = 0, gamma: float = 0.1) -> None:
        self.milestones = sorted(int(m) for m in milestones)
        self.warmup = int(warmup)
        self.gamma = float(gamma)

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup:
            factor *= (iteration + 1) / self.warmup
        return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Sequence[int], warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` to be stepped once per iteration, after ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, MultiStepWarmup(milestones, warmup))
