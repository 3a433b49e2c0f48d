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
from model.config import RefineDetConfig
from model.layers import MultiLevelHead
from model.parts import RefineDetParts, build_parts


class RefineDetOutput(NamedTuple):
    arm_loc: Tensor  # [B, A, 4] offsets of refined anchors w.r.t. the tiled anchors
    arm_conf: Tensor  # [B, A, 2] logits background / object
    odm_loc: Tensor  # [B, A, 4] offsets of final boxes w.r.t. the refined anchors
    odm_conf: Tensor  # [B, A, C] logits, background at index 0


OUTPUT_NAMES = ("arm_loc", "arm_conf", "odm_loc", "odm_conf")


class RefineDet(nn.Module):
    """Wires the parts (``model.parts``) it is given; raises ``ValueError`` where they disagree with each
    other or with the config (see ``check_parts``)."""

    anchors: Tensor  # [A, 4] priors_cxcywh, a non-persistent buffer computed once from the config

    def __init__(self, config: RefineDetConfig, parts: RefineDetParts) -> None:
        super().__init__()
        check_parts(config, parts)
        self.config = config
        self.backbone = parts.backbone
        self.arm_adapters = parts.arm_adapters
        self.arm_loc, self.arm_conf = parts.arm_loc, parts.arm_conf
        self.tcbs = parts.tcbs
        self.odm_adapters = parts.odm_adapters
        self.odm_loc, self.odm_conf = parts.odm_loc, parts.odm_conf
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
    """The network for ``config``, from its backbone's parts (``model.parts``)."""
    return RefineDet(config, build_parts(config))


def check_parts(config: RefineDetConfig, parts: RefineDetParts) -> None:
    """Raise ``ValueError`` unless every head predicts for the anchors the config generates (anchors per
    location, one conv per level) and the values the loss and post-processing expect, the backbone
    gives one source map per anchor level, and TCBs are present exactly when the config uses them."""
    k = config.anchors.anchors_per_location
    levels = len(config.anchors.steps)
    sources = len(getattr(parts.backbone, "out_channels", ()))
    if sources != levels:
        raise ValueError(f"the backbone gives {sources} source maps; the anchor config has {levels} levels")
    values = {"arm_loc": 4, "arm_conf": 2, "odm_loc": 4, "odm_conf": config.num_classes}
    for name, expected in values.items():
        head: MultiLevelHead = getattr(parts, name)
        if head.anchors_per_location != k:
            raise ValueError(
                f"{name} predicts {head.anchors_per_location} anchors per location; the anchor "
                f"generator makes {k} (aspect ratios {config.anchors.aspect_ratios})"
            )
        if head.num_levels != levels:
            raise ValueError(f"{name} has {head.num_levels} levels; the anchor config has {levels}")
        if head.values != expected:
            raise ValueError(f"{name} predicts {head.values} values per anchor; expected {expected}")
    if (parts.tcbs is not None) != config.ablation.tcb:
        raise ValueError(
            f"config.ablation.tcb is {config.ablation.tcb} but the parts {'lack' if config.ablation.tcb else 'have'} TCBs"
        )


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
