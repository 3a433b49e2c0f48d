"""The RefineDet network: backbone -> ARM heads; TCBs -> ODM heads. Returns raw tensors only.

``forward(images) -> RefineDetOutput(arm_loc [B,A,4], arm_conf [B,A,2], odm_loc [B,A,4],
odm_conf [B,A,C])``: fixed shapes, no decoding, no data-dependent control flow, so the module traces
and exports cleanly. Loss (``model.loss``) and post-processing (``model.postprocess``) are separate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.anchors import generate_anchors
from model.backbones import build_backbone
from model.config import RefineDetConfig
from model.layers import Bottleneck, MultiLevelHead, TransferConnectionBlock, init_new_layers


class RefineDetOutput(NamedTuple):
    arm_loc: Tensor  # [B, A, 4] offsets of refined anchors w.r.t. the tiled anchors
    arm_conf: Tensor  # [B, A, 2] logits background / object
    odm_loc: Tensor  # [B, A, 4] offsets of final boxes w.r.t. the refined anchors
    odm_conf: Tensor  # [B, A, C] logits, background at index 0


OUTPUT_NAMES = ("arm_loc", "arm_conf", "odm_loc", "odm_conf")


class RefineDet(nn.Module):
    anchors: Tensor  # [A, 4] priors_cxcywh, a non-persistent buffer computed once from the config

    def __init__(self, config: RefineDetConfig) -> None:
        super().__init__()
        self.config = config
        k = config.anchors.anchors_per_location
        ch = config.tcb_channels
        resnet = config.backbone == "resnet101"
        self.backbone = build_backbone(config.backbone)
        source_ch = list(self.backbone.out_channels)
        # ResNet: an extra 256-256-1024 bottleneck before every ARM and ODM head (heads see 1024 ch).
        self.arm_adapters = nn.ModuleList(Bottleneck(c, 256, 1024) for c in source_ch) if resnet else None
        arm_in = [1024] * 4 if resnet else source_ch
        self.arm_loc = MultiLevelHead(arm_in, k, 4)
        self.arm_conf = MultiLevelHead(arm_in, k, 2)
        self.tcbs: nn.ModuleList | None = None
        if config.ablation.tcb:
            n = len(source_ch)
            self.tcbs = nn.ModuleList(
                TransferConnectionBlock(c, ch, top=(i == n - 1), bn=resnet) for i, c in enumerate(source_ch)
            )
            odm_src = [ch] * n
        else:  # SSD-like ablation: the ODM heads sit directly on the ARM's source maps
            odm_src = source_ch
        self.odm_adapters = nn.ModuleList(Bottleneck(c, 256, 1024) for c in odm_src) if resnet else None
        odm_in = [1024] * 4 if resnet else odm_src
        self.odm_loc = MultiLevelHead(odm_in, k, 4)
        self.odm_conf = MultiLevelHead(odm_in, k, config.num_classes)
        heads = [self.arm_loc, self.arm_conf, self.odm_loc, self.odm_conf]
        for module in [*heads, self.tcbs, self.arm_adapters, self.odm_adapters]:
            if module is not None:
                init_new_layers(module)
        self.register_buffer("anchors", generate_anchors(config), persistent=False)

    def forward(self, images: Tensor) -> RefineDetOutput:
        """images: Tensor[B, 3, S, S], already normalised per ``config.normalization``."""
        sources = self.backbone(images)
        arm_feats = (
            [a(x) for a, x in zip(self.arm_adapters, sources, strict=True)] if self.arm_adapters else sources
        )
        odm_feats = self._transfer(sources) if self.tcbs is not None else sources
        if self.odm_adapters is not None:
            odm_feats = [a(x) for a, x in zip(self.odm_adapters, odm_feats, strict=True)]
        return RefineDetOutput(
            self.arm_loc(arm_feats),
            self.arm_conf(arm_feats),
            self.odm_loc(odm_feats),
            self.odm_conf(odm_feats),
        )

    def _transfer(self, sources: list[Tensor]) -> list[Tensor]:
        assert self.tcbs is not None
        out: list[Tensor] = []
        higher = None
        for tcb, x in zip(reversed(self.tcbs), reversed(sources), strict=True):
            higher = tcb(x, higher)
            out.append(higher)
        return out[::-1]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: RefineDetConfig) -> RefineDet:
    return RefineDet(config)


@torch.no_grad()
def feature_map_sizes(model: RefineDet) -> list[int]:
    """Spatial sizes of the four source maps, measured by running the backbone (a config cross-check)."""
    s = model.config.input_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sizes = [f.shape[-1] for f in model.backbone(torch.zeros(1, 3, s, s, device=device))]
    model.train(was_training)
    return sizes
