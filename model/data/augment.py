"""Training augmentation (the SSD/RefineDet recipe) and the evaluation resize, on uint8 RGB tensors.

Both are callables ``(image uint8 [3, H, W], boxes_xyxy pixels [G, 4], labels [G]) -> (image uint8
[3, S, S], boxes_xyxy normalised to [0, 1] [G', 4], labels [G'])``. ``labels`` may be any per-box
tensor (the data sets pass row ids to keep other per-box fields aligned); rows keep their order.
Normalisation is not done here: the trainer normalises batches on the device.

``TrainAugmentation`` follows the original order: photometric distort -> expand -> min-IoU crop ->
resize -> horizontal flip.

- Expand (p 0.5): canvas ratio U[1, 4], filled with the mean colour, image placed uniformly (the
  semantics of ``torchvision.transforms.v2.RandomZoomOut``).
- Crop: the original code's batch samplers (``model.data.sampling.sample_crop``). torchvision's
  ``v2.RandomIoUCrop`` is a different sampler (it draws one constraint at a time and redraws until
  one succeeds, samples width and height independently and only scores boxes whose centre is inside),
  so it is not used. A box is kept if its centre lies inside the crop (edges included), then clipped.
- Resize to S x S with an interpolation drawn at random (bilinear, area ~ antialiased bilinear,
  nearest, bicubic, antialiased bicubic ~ Lanczos), via ``torchvision.transforms.v2.functional.resize``.
- Flip (p 0.5).

For speed, expand + crop + resize are fused: only the part of the image the crop shows is distorted
and resized, then pasted on a mean-coloured S x S canvas, so the up-to-16x expanded canvas is never
built. Photometric distortion is per pixel, so distorting that part equals distorting the whole image.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode

from model.data.photometric import photometric_distort
from model.data.sampling import sample_crop, sample_expand
from model.preprocess import resize_to_input

INTERPOLATIONS = (
    (InterpolationMode.BILINEAR, False),
    (InterpolationMode.BILINEAR, True),
    (InterpolationMode.NEAREST, False),
    (InterpolationMode.BICUBIC, False),
    (InterpolationMode.BICUBIC, True),
)


class TrainAugmentation:
    """The training augmentation at output size ``size``; ``mean_rgb`` (0-255) fills the expanded canvas."""

    def __init__(self, size: int, mean_rgb: tuple[float, float, float] = (123.0, 117.0, 104.0)) -> None:
        self.size = size
        self.fill = torch.tensor([round(float(m)) for m in mean_rgb], dtype=torch.uint8).view(3, 1, 1)

    def __call__(
        self, image: Tensor, boxes_xyxy: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        h, w = image.shape[-2:]
        boxes = boxes_xyxy.float().reshape(-1, 4)
        canvas_w, canvas_h, left, top = sample_expand(w, h, generator)
        boxes = boxes + torch.tensor([left, top, left, top], dtype=torch.float32)
        canvas = torch.tensor([canvas_w, canvas_h, canvas_w, canvas_h], dtype=torch.float32)
        x0, y0, x1, y1 = _to_pixels(sample_crop(boxes / canvas, generator), canvas_w, canvas_h)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
        crop_size = torch.tensor([x1 - x0, y1 - y0] * 2, dtype=torch.float32)
        kept = (boxes[inside] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)).clamp(min=0)
        kept = torch.minimum(kept, crop_size) / crop_size
        positive = (kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])
        kept, kept_labels = kept[positive], labels[inside][positive]
        u = torch.rand(2, generator=generator)
        mode, antialias = INTERPOLATIONS[int(u[0] * len(INTERPOLATIONS))]
        out = self._render(image, (left, top), (x0, y0, x1, y1), mode, antialias, generator)
        if u[1] < 0.5:
            out = out.flip(-1)
            kept = torch.stack([1 - kept[:, 2], kept[:, 1], 1 - kept[:, 0], kept[:, 3]], dim=1)
        return out, kept, kept_labels

    def _render(
        self,
        image: Tensor,
        offset: tuple[int, int],
        crop: tuple[int, int, int, int],
        mode: InterpolationMode,
        antialias: bool,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The crop ``(x0, y0, x1, y1)`` of the canvas holding ``image`` at ``offset``, distorted and
        resized to S x S -> uint8 Tensor[3, S, S]."""
        (left, top), (x0, y0, x1, y1), s = offset, crop, self.size
        h, w = image.shape[-2:]
        ix0, iy0, ix1, iy1 = max(x0, left), max(y0, top), min(x1, left + w), min(y1, top + h)
        visible = image[:, max(iy0 - top, 0) : max(iy1 - top, 0), max(ix0 - left, 0) : max(ix1 - left, 0)]
        visible = photometric_distort(visible, generator) if visible.numel() else visible
        if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):  # the crop lies inside the image
            return TF.resize(visible, [s, s], interpolation=mode, antialias=antialias)
        out = self.fill.expand(3, s, s).clone()
        sx, sy = s / (x1 - x0), s / (y1 - y0)
        ox0, ox1 = round((ix0 - x0) * sx), round((ix1 - x0) * sx)
        oy0, oy1 = round((iy0 - y0) * sy), round((iy1 - y0) * sy)
        if visible.numel() and ox1 > ox0 and oy1 > oy0:
            out[:, oy0:oy1, ox0:ox1] = TF.resize(
                visible, [oy1 - oy0, ox1 - ox0], interpolation=mode, antialias=antialias
            )
        return out


def _to_pixels(rect: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised crop -> integer pixel rect of at least one pixel, inside [0, width] x [0, height]."""
    x0 = min(int(rect[0] * width), width - 1)
    y0 = min(int(rect[1] * height), height - 1)
    x1 = min(max(x0 + 1, int(rect[2] * width)), width)
    y1 = min(max(y0 + 1, int(rect[3] * height)), height)
    return x0, y0, x1, y1


class EvalTransform:
    """Plain resize (warp) to S x S with ``model.preprocess.resize_to_input`` (bilinear, no antialias),
    rounded back to uint8; boxes are divided by the original (W, H). The ``--no-augment`` path."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(
        self, image: Tensor, boxes_xyxy: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        h, w = image.shape[-2:]
        out = resize_to_input(image[None].float(), self.size)[0].round_().clamp_(0, 255).to(torch.uint8)
        boxes = boxes_xyxy.float().reshape(-1, 4) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return out, boxes, labels
