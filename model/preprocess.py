"""The image contract shared by training, evaluation, export verification and serving.

Images enter as uint8 RGB tensors [3, H, W] (``load_image`` decodes files, applying EXIF orientation
and flattening alpha / grayscale / 16-bit to RGB). ``preprocess`` warps them to the model's square
input (plain resize, no letterbox, as the original), then applies the config's ``Normalization``:
channel order, scale, mean and std. It runs on whatever device the tensors are on (GPU in serving),
in whatever memory format they are in (``preprocess``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import Normalization


def normalize(images: Tensor, norm: Normalization) -> Tensor:
    """Float RGB images [B, 3, S, S] in 0-255 -> network input per ``norm``."""
    if norm.channel_order == "BGR":
        images = images.flip(1)
    mean = images.new_tensor(norm.mean).view(1, 3, 1, 1)
    std = images.new_tensor(norm.std).view(1, 3, 1, 1)
    x = images * norm.scale if norm.scale != 1.0 else images
    return (x - mean) / std if norm.std != (1.0, 1.0, 1.0) else x - mean


def resize_to_input(images: Tensor, size: int) -> Tensor:
    """Float [B, 3, H, W] -> [B, 3, size, size], bilinear, no antialias (the training resize)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def preprocess(
    images: Sequence[Tensor] | Tensor, size: int, norm: Normalization, dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 RGB images ([3, H, W] each, any sizes, or one [B, 3, H, W]) -> Tensor[B, 3, size, size].

    Resizes in the memory format it is given: a channels-last batch (e.g. ``pil_to_rgb(contiguous=False)``
    unsqueezed) is resized channels-last, PyTorch's fast path for a bilinear resize on a CPU (3x faster at
    640x480 -> 320, the same values). The result is contiguous (NCHW) either way."""
    if isinstance(images, Tensor) and images.dim() == 4:
        batch = resize_to_input(images.float(), size).contiguous()
    else:
        batch = torch.cat([resize_to_input(im[None].float(), size) for im in images])
    return normalize(batch, norm).to(dtype)


def pil_to_rgb(image, contiguous: bool = True) -> Tensor:
    """A PIL image of any mode -> uint8 RGB Tensor[3, H, W] (EXIF orientation applied). With
    ``contiguous=False`` the tensor is a view over the decoded [H, W, 3] array (channels-last strides)
    rather than a copy: one pass over the pixels less, and ``preprocess`` resizes such an image about 3x
    faster on a CPU (the same values, docs/benchmarks.md)."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale -> 8-bit
        arr = np.asarray(image, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        image = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
    elif image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return pixels.contiguous() if contiguous else pixels


def load_image(path: str | Path) -> Tensor:
    """Decode an image file -> uint8 RGB Tensor[3, H, W]."""
    from PIL import Image

    with Image.open(path) as im:
        return pil_to_rgb(im)
