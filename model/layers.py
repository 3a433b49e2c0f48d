"""Small building blocks: L2Norm, transfer connection blocks, bottlenecks and prediction heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels with a learnable per-channel scale.

    Written with plain broadcasting (no unsqueeze/expand_as) so every converter handles it; the sum of
    squares is taken in float32 because conv4_3 activations overflow it in float16.
    """

    def __init__(self, channels: int, scale: float, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        inv_norm = torch.rsqrt(x.float().pow(2).sum(dim=1, keepdim=True) + self.eps).to(x.dtype)
        return x * inv_norm * self.weight.to(x.dtype).view(1, -1, 1, 1)


def conv3x3(in_ch: int, out_ch: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(out_ch))
    return layers


class TransferConnectionBlock(nn.Module):
    """TCB: converts an ARM source map to ODM features, adding the upsampled higher-level TCB output.

    ``lateral``: conv3x3 + ReLU, conv3x3. ``upsample``: ConvTranspose 2x2 stride 2 (the original code's
    kernel; the paper's figure shows 4x4). ReLU after the sum, then conv3x3 + ReLU. The top level has
    no upsample input and three conv3x3 + ReLU. ``bn`` adds BatchNorm after every conv/deconv (ResNet).
    """

    def __init__(self, in_ch: int, ch: int = 256, top: bool = False, bn: bool = False) -> None:
        super().__init__()
        self.top = top
        if top:
            self.lateral = nn.Sequential(
                *conv3x3(in_ch, ch, bn), nn.ReLU(inplace=True), *conv3x3(ch, ch, bn), nn.ReLU(inplace=True)
            )
            self.upsample = None
        else:
            self.lateral = nn.Sequential(*conv3x3(in_ch, ch, bn), nn.ReLU(inplace=True), *conv3x3(ch, ch, bn))
            up: list[nn.Module] = [nn.ConvTranspose2d(ch, ch, 2, stride=2, bias=not bn)]
            if bn:
                up.append(nn.BatchNorm2d(ch))
            self.upsample = nn.Sequential(*up)
        self.out = nn.Sequential(*conv3x3(ch, ch, bn), nn.ReLU(inplace=True))

    def forward(self, x: Tensor, higher: Tensor | None = None) -> Tensor:
        y = self.lateral(x)
        if self.upsample is not None:
            if higher is None:
                raise ValueError("a non-top TCB needs the higher-level TCB output")
            y = torch.relu(y + self.upsample(higher))
        return self.out(y)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 - 3x3 - 1x1, BN) with a projection shortcut; stride on the 3x3."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class MultiLevelHead(nn.Module):
    """One 3x3 conv per level predicting ``values`` numbers for each of ``anchors_per_location``
    anchors; outputs are permuted to NHWC, flattened and concatenated over levels: Tensor[B, A, values]."""

    def __init__(self, in_channels: list[int], anchors_per_location: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.anchors_per_location = anchors_per_location
        self.convs = nn.ModuleList(
            nn.Conv2d(c, anchors_per_location * values, 3, padding=1) for c in in_channels
        )

    @property
    def num_levels(self) -> int:
        return len(self.convs)

    def forward(self, features: list[Tensor]) -> Tensor:
        outs = []
        for conv, x in zip(self.convs, features, strict=True):
            y = conv(x).permute(0, 2, 3, 1)
            outs.append(y.reshape(y.shape[0], -1, self.values))
        return torch.cat(outs, dim=1)


def init_new_layers(module: nn.Module) -> None:
    """Xavier-uniform weights and zero bias for convolutions and deconvolutions (the original init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
