"""Random geometry of the training augmentation: the expand canvas and the original code's crop samplers.

``sample_crop`` reproduces the Caffe SSD/RefineDet ``batch_sampler`` list: sampler 0 keeps the whole
image; samplers 1-6 each try up to 50 random crops with scale U[0.3, 1] and aspect ratio
U[max(0.5, scale^2), min(2, 1/scale^2)] (width = scale * sqrt(ar), height = scale / sqrt(ar), relative
to the image, placed uniformly) and keep the first whose IoU with *some* ground-truth box satisfies the
sampler's constraint: min IoU 0.1, 0.3, 0.5, 0.7, 0.9, or (sampler 6) only max IoU 1.0. One crop is
then picked uniformly among the samplers that found one. An image without boxes keeps the whole image.
All 300 trials are drawn and scored in one batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

EXPAND_MAX_RATIO = 4.0
EXPAND_PROB = 0.5
MIN_SCALE = 0.3
ASPECT_RANGE = (0.5, 2.0)
TRIALS = 50
# (min IoU, max IoU) of samplers 1-6
SAMPLERS = torch.tensor([[0.1, 1.0], [0.3, 1.0], [0.5, 1.0], [0.7, 1.0], [0.9, 1.0], [0.0, 1.0]])


def sample_expand(
    width: int, height: int, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """-> (canvas_w, canvas_h, left, top): with p 0.5 a canvas ratio U[1, 4] times the image, which
    sits at a uniform offset; otherwise the image itself (ratio 1, offset 0)."""
    u = torch.rand(4, generator=generator).tolist()
    if u[0] >= EXPAND_PROB:
        return width, height, 0, 0
    ratio = 1.0 + (EXPAND_MAX_RATIO - 1.0) * u[1]
    canvas_w, canvas_h = int(width * ratio), int(height * ratio)
    return canvas_w, canvas_h, int((canvas_w - width) * u[2]), int((canvas_h - height) * u[3])


def random_crops(num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` crops of the original samplers' distribution -> Tensor[num, 4] xyxy normalised."""
    u = torch.rand(4, num, generator=generator)
    scale = MIN_SCALE + (1.0 - MIN_SCALE) * u[0]
    low = torch.clamp(scale**2, min=ASPECT_RANGE[0])
    high = torch.clamp(1.0 / scale**2, max=ASPECT_RANGE[1])
    aspect = low + (high - low) * u[1]
    w, h = scale * aspect.sqrt(), scale / aspect.sqrt()
    x0, y0 = (1.0 - w) * u[2], (1.0 - h) * u[3]
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def sample_crop(
    boxes_xyxy: Tensor, generator: torch.Generator | None = None
) -> tuple[float, float, float, float]:
    """boxes_xyxy: Tensor[G, 4] normalised to the (expanded) image -> one crop (x0, y0, x1, y1) normalised."""
    found = [(0.0, 0.0, 1.0, 1.0)]
    if boxes_xyxy.numel():
        crops = random_crops(len(SAMPLERS) * TRIALS, generator)
        iou = box_iou(crops, boxes_xyxy.float()).view(len(SAMPLERS), TRIALS, -1)
        bounds = SAMPLERS.view(-1, 1, 1, 2)
        ok = ((iou >= bounds[..., 0]) & (iou <= bounds[..., 1])).any(dim=-1)  # [samplers, trials]
        first = ok.int().argmax(dim=1)  # first successful trial (0 if none; masked below)
        for s in torch.nonzero(ok.any(dim=1)).flatten().tolist():
            found.append(tuple(crops.view(len(SAMPLERS), TRIALS, 4)[s, first[s]].tolist()))
    pick = int(torch.randint(len(found), (1,), generator=generator))
    return found[pick]  # type: ignore[return-value]
