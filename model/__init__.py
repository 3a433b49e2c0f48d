"""RefineDet in PyTorch: network, anchors, box coding, matching, loss, post-processing, data,
training and evaluation. This package imports nothing from ``conversion`` or ``service``."""

from model.config import PRESETS, RefineDetConfig, preset

__all__ = ["PRESETS", "RefineDetConfig", "preset"]
