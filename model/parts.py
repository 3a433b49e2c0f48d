"""The parts a RefineDet is wired from, and one builder per backbone (torchvision's SSD style).

``RefineDet(config, parts)`` only connects the modules it is given and checks them against each other
and the config (``model.network.check_parts``); what differs between backbones lives here, in
``vgg16_parts`` and ``resnet101_parts``:

- VGG-16: the heads and TCBs sit directly on the four source maps (conv4_3 / conv5_3 L2-normalised).
- ResNet-101: BatchNorm in the TCBs, and one extra 256-256-1024 bottleneck before every ARM and ODM
  head (heads see 1024 channels).

Module names (``backbone``, ``arm_adapters``, ``arm_loc`` ...) are the checkpoints' state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from model.backbones import ResNet101Body, VGG16Body
from model.config import RefineDetConfig
from model.layers import Bottleneck, MultiLevelHead, TransferConnectionBlock, init_new_layers


@dataclass
class RefineDetParts:
    """``backbone``: images -> the four ARM source maps, with ``out_channels``. The four heads predict
    4 (loc), 2 (ARM conf) or ``num_classes`` (ODM conf) values per anchor. ``tcbs``: one TCB per level,
    None for the no-TCB ablation (ODM heads on the source maps). ``*_adapters``: one module per level
    between the features and the heads, or None."""

    backbone: nn.Module
    arm_loc: MultiLevelHead
    arm_conf: MultiLevelHead
    odm_loc: MultiLevelHead
    odm_conf: MultiLevelHead
    tcbs: nn.ModuleList | None = None
    arm_adapters: nn.ModuleList | None = None
    odm_adapters: nn.ModuleList | None = None


def vgg16_parts(config: RefineDetConfig) -> RefineDetParts:
    return _assemble(config, VGG16Body(), head_channels=None, batch_norm=False)


def resnet101_parts(config: RefineDetConfig) -> RefineDetParts:
    return _assemble(config, ResNet101Body(), head_channels=1024, batch_norm=True)


BACKBONE_PARTS: dict[str, Callable[[RefineDetConfig], RefineDetParts]] = {
    "vgg16": vgg16_parts,
    "resnet101": resnet101_parts,
}


def build_parts(config: RefineDetConfig) -> RefineDetParts:
    """The parts for ``config.backbone``."""
    try:
        builder = BACKBONE_PARTS[config.backbone]
    except KeyError:
        raise ValueError(
            f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONE_PARTS)}"
        ) from None
    return builder(config)


def _assemble(
    config: RefineDetConfig, backbone: nn.Module, head_channels: int | None, batch_norm: bool
) -> RefineDetParts:
    """Heads (and TCBs, adapters) sized from the config and the backbone's channels. ``head_channels``:
    put a bottleneck with that many output channels before every head (None: none)."""
    k = config.anchors.anchors_per_location
    sources = list(backbone.out_channels)  # type: ignore[arg-type]
    arm_adapters = _adapters(sources, head_channels)
    arm_in = [head_channels] * len(sources) if head_channels else sources
    arm_loc, arm_conf = MultiLevelHead(arm_in, k, 4), MultiLevelHead(arm_in, k, 2)
    tcbs = None
    odm_sources = sources  # the no-TCB ablation: ODM heads on the ARM's source maps
    if config.ablation.tcb:
        last = len(sources) - 1
        tcbs = nn.ModuleList(
            TransferConnectionBlock(c, config.tcb_channels, top=i == last, bn=batch_norm)
            for i, c in enumerate(sources)
        )
        odm_sources = [config.tcb_channels] * len(sources)
    odm_adapters = _adapters(odm_sources, head_channels)
    odm_in = [head_channels] * len(sources) if head_channels else odm_sources
    odm_loc, odm_conf = MultiLevelHead(odm_in, k, 4), MultiLevelHead(odm_in, k, config.num_classes)
    for module in (arm_loc, arm_conf, odm_loc, odm_conf, tcbs, arm_adapters, odm_adapters):
        if module is not None:
            init_new_layers(module)
    return RefineDetParts(backbone, arm_loc, arm_conf, odm_loc, odm_conf, tcbs, arm_adapters, odm_adapters)


def _adapters(channels: Sequence[int], out_channels: int | None) -> nn.ModuleList | None:
    if out_channels is None:
        return None
    return nn.ModuleList(Bottleneck(c, 256, out_channels) for c in channels)
