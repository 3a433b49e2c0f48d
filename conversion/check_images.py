"""Images to check an artifact against its checkpoint where no data set exists (a container at first
start): deterministic synthetic blood smears, drawn from a seed.

They are not BCCD and no accuracy is measured on them (that is ``refinedet eval``); they only have to
make the network compute what it computes on real smears, so that the artifact's raw outputs and
detections can be compared with the checkpoint's (``conversion.verify``): a pale pink-beige field with
noise, overlapping red discs with lighter centres (red cells), a large purple lobed cell (white cell)
and small purple dots (platelets), at the 640x480 of the BCCD photos. The shipped model finds cells in
them (tests/conversion/test_check_images.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

WIDTH, HEIGHT = 640, 480


def synthetic_smears(count: int = 8, seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> list[Tensor]:
    """``count`` uint8 RGB Tensor[3, height, width] smears (the same for the same arguments)."""
    gen = torch.Generator().manual_seed(seed)
    return [_smear(gen, width, height) for _ in range(count)]


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _smear(gen: torch.Generator, width: int, height: int) -> Tensor:
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    background = torch.tensor([222.0, 200.0, 196.0])[:, None, None] + _uniform(gen, -12, 12)
    image = background.expand(3, height, width).clone()
    red_cell = torch.tensor([205.0, 120.0, 125.0])
    for _ in range(int(_uniform(gen, 18, 34))):
        cx, cy, r = _uniform(gen, 0, width), _uniform(gen, 0, height), _uniform(gen, 26, 40)
        d = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt() / r
        disc = ((1.0 - d).clamp(0, 0.15) / 0.15) * (0.55 + 0.45 * d.clamp(0, 1))  # lighter centre
        image = image * (1 - disc) + red_cell[:, None, None] * disc
    purple = torch.tensor([95.0, 60.0, 150.0])
    cx, cy = _uniform(gen, 80, width - 80), _uniform(gen, 80, height - 80)
    for _ in range(3):  # a lobed nucleus
        lx, ly, r = cx + _uniform(gen, -22, 22), cy + _uniform(gen, -22, 22), _uniform(gen, 22, 34)
        blob = (((xs - lx) ** 2 + (ys - ly) ** 2).sqrt() < r).float()
        image = image * (1 - blob) + purple[:, None, None] * blob
    for _ in range(int(_uniform(gen, 1, 5))):
        px, py, r = _uniform(gen, 0, width), _uniform(gen, 0, height), _uniform(gen, 5, 9)
        dot = (((xs - px) ** 2 + (ys - py) ** 2).sqrt() < r).float()
        image = image * (1 - dot) + purple[:, None, None] * dot
    noise = torch.randn(3, height, width, generator=gen) * 6.0
    return (image + noise).round().clamp(0, 255).to(torch.uint8)
