"""SSD/RefineDet photometric distortion (the original code's ``DistortImage``), on uint8 RGB tensors.

Each step fires with probability 0.5: brightness +U[-32, 32] (additive, in 0-255 units); contrast
x U[0.5, 1.5] (a plain multiply, as the original's ``convertTo(alpha)``, not torchvision's blend with
the mean); saturation x U[0.5, 1.5]; hue + U[-18, 18] degrees. Contrast comes either before the
saturation/hue pair or after it (p 0.5). Values are clamped to [0, 255] after brightness/contrast.

Saturation is ``torchvision.transforms.v2.functional.adjust_saturation`` (blend with the grayscale
image). Hue is an exact HSV hue rotation written here in closed form because torchvision's
``adjust_hue`` (a full RGB->HSV->RGB round trip) costs ~20 ms on a 640x480 image, ~5x this one; the
tests check both agree.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA_DEGREES = 18.0


def adjust_hue(image: Tensor, hue_factor: float) -> Tensor:
    """Rotate the HSV hue of float RGB images [..., 3, H, W] in [0, 1] by ``hue_factor`` turns
    (torchvision's convention, in [-0.5, 0.5]); value and saturation are unchanged."""
    r, g, b = image.unbind(dim=-3)
    maxc = image.amax(dim=-3)
    chroma = maxc - image.amin(dim=-3)
    # hue in sextants [0, 6): (g - b) / C if R is largest, (b - r) / C + 2 if G, (r - g) / C + 4 if B
    red, green = r == maxc, g == maxc
    numerator = torch.where(red, g - b, torch.where(green, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
    hue = numerator.div_(torch.where(chroma > 0, chroma, 1.0)).add_(6.0 * hue_factor).remainder_(6.0)
    out = torch.empty_like(image)
    for i, n in enumerate(
        (5.0, 3.0, 1.0)
    ):  # hsv -> rgb: V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6
        k = hue + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        torch.addcmul(
            maxc, chroma, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0, out=out.select(-3, i)
        )
    return out


def _uniform(u: Tensor, low: float, high: float) -> float:
    return float(low + (high - low) * u)


def photometric_distort(image: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8 RGB Tensor[3, H, W] -> distorted uint8 RGB Tensor[3, H, W] (see the module docstring)."""
    u = torch.rand(9, generator=generator)
    fire = u[:5] < 0.5  # brightness, contrast, saturation, hue, contrast-first
    if not bool(fire[:4].any()):
        return image
    x = image.float()
    if fire[0]:
        x += _uniform(u[5], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast = _uniform(u[6], *CONTRAST_RANGE) if fire[1] else None
    if contrast is not None and fire[4]:
        x *= contrast
    x = x.clamp_(0.0, 255.0).div_(255.0)
    if fire[2]:
        x = TF.adjust_saturation(x, _uniform(u[7], *SATURATION_RANGE))
    if fire[3]:
        x = adjust_hue(x, _uniform(u[8], -HUE_DELTA_DEGREES, HUE_DELTA_DEGREES) / 360.0)
    if contrast is not None and not fire[4]:
        x = (x * contrast).clamp_(0.0, 1.0)
    return x.mul_(255.0).add_(0.5).to(torch.uint8)  # round half up (values are in [0, 255])
