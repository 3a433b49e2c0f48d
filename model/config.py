"""Typed, frozen configuration for RefineDet and the four named presets.

Everything that shapes the network, its anchors, its loss or its post-processing lives here, so a
checkpoint can carry its config and rebuild the exact model from the file alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Backbone = Literal["vgg16", "resnet101"]
NegativeFilter = Literal["code", "paper"]


@dataclass(frozen=True)
class Normalization:
    """The image contract: channel order, value range and mean/std applied before the network.

    The original RefineDet takes BGR 0-255 images minus the Caffe mean (104, 117, 123) with no std
    division. ``mean``/``std`` are given in ``channel_order``.
    """

    channel_order: Literal["BGR", "RGB"] = "BGR"
    scale: float = 1.0  # pixel values are uint8 * scale before mean/std (1.0 -> 0-255, 1/255 -> 0-1)
    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @staticmethod
    def torchvision() -> Normalization:
        """The ImageNet RGB 0-1 mean/std contract of torchvision's pretrained backbones."""
        return Normalization("RGB", 1.0 / 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class AnchorConfig:
    """Anchors per ARM source level (conv4_3, conv5_3, fc7, conv6_2 for VGG)."""

    steps: tuple[int, ...] = (8, 16, 32, 64)
    sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0)
    aspect_ratios: tuple[float, ...] = (2.0,)  # each r adds r and 1/r next to the 1:1 anchor
    offset: float = 0.5
    variances: tuple[float, float] = (0.1, 0.2)

    @property
    def anchors_per_location(self) -> int:
        return 1 + 2 * len(self.aspect_ratios)


@dataclass(frozen=True)
class LossConfig:
    """Multi-task loss settings. ``negative_filter`` "code" keeps ARM-easy anchors that are positives
    (the original Caffe code); "paper" drops every anchor with ARM background prob > theta
    (``RefineDetConfig.filter_threshold``)."""

    match_threshold: float = 0.5
    negative_ratio: int = 3
    negative_filter: NegativeFilter = "code"


@dataclass(frozen=True)
class PostprocessConfig:
    """Inference-time selection. Paper text: top_k 400 / keep_top_k 200 (the default here); the
    original code uses 1000 / 500 (``PostprocessConfig.original_code()``)."""

    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    top_k: int = 400
    keep_top_k: int = 200

    @staticmethod
    def original_code() -> PostprocessConfig:
        return PostprocessConfig(top_k=1000, keep_top_k=500)


@dataclass(frozen=True)
class Ablation:
    """Switches for the paper's Table 3 variants (all True is the full model).

    - ``negative_filtering``: negative anchor filtering in the ODM loss and at inference.
    - ``cascade``: ODM regresses from the ARM-refined anchors (two-step); False uses the tiled anchors.
    - ``tcb``: transfer connection blocks feed the ODM; False makes the ARM predict classes (SSD-like).
    """

    negative_filtering: bool = True
    cascade: bool = True
    tcb: bool = True


VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class RefineDetConfig:
    """A complete RefineDet model description. ``class_names`` excludes background; the network
    predicts ``num_classes = len(class_names) + 1`` scores with background at index 0."""

    name: str = "refinedet320_vgg16"
    backbone: Backbone = "vgg16"
    input_size: int = 320
    class_names: tuple[str, ...] = VOC_CLASSES
    tcb_channels: int = 256
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    normalization: Normalization = field(default_factory=Normalization)
    ablation: Ablation = field(default_factory=Ablation)
    # theta of negative anchor filtering, for the loss and inference alike: an anchor whose ARM
    # background probability exceeds it is never an ODM negative and gets every class score zeroed.
    filter_threshold: float = 0.99

    def __post_init__(self) -> None:
        if self.input_size % 64 != 0 or self.input_size < 64:
            raise ValueError(f"input_size must be a positive multiple of 64, got {self.input_size}")
        if not self.class_names:
            raise ValueError("class_names must name at least one object class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {self.class_names}")
        if len(self.anchors.steps) != len(self.anchors.sizes):
            raise ValueError("anchors.steps and anchors.sizes must have one entry per level")

    @property
    def num_classes(self) -> int:
        """Object classes plus background."""
        return len(self.class_names) + 1

    @property
    def feature_map_sizes(self) -> tuple[int, ...]:
        return tuple(self.input_size // s for s in self.anchors.steps)

    @property
    def num_anchors(self) -> int:
        per_loc = self.anchors.anchors_per_location
        return sum(f * f * per_loc for f in self.feature_map_sizes)

    def replace(self, **changes: Any) -> RefineDetConfig:
        """A copy with fields changed; nested configs may be given as dicts of their fields."""
        for key in ("anchors", "loss", "postprocess", "normalization", "ablation"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        if "class_names" in changes:
            changes["class_names"] = tuple(changes["class_names"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RefineDetConfig:
        def tuples(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        nested = {
            "anchors": AnchorConfig,
            "loss": LossConfig,
            "postprocess": PostprocessConfig,
            "normalization": Normalization,
            "ablation": Ablation,
        }
        known = {f.name for f in dataclasses.fields(RefineDetConfig)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RefineDet config keys: {sorted(unknown)}")
        data = _moved_filter_threshold(data)
        kwargs = tuples({k: v for k, v in data.items() if k not in nested})
        for key, cls in nested.items():
            if key in data:
                kwargs[key] = cls(**tuples(data[key]))
        return RefineDetConfig(**kwargs)


def _moved_filter_threshold(data: dict[str, Any]) -> dict[str, Any]:
    """Configs written before theta had one place (checkpoints, manifests) stored it in both ``loss``
    and ``postprocess``; it becomes the top-level ``filter_threshold``. Two different values cannot be
    represented any more and are refused."""
    old = {
        key: data[key]["filter_threshold"]
        for key in ("loss", "postprocess")
        if isinstance(data.get(key), dict) and "filter_threshold" in data[key]
    }
    if not old:
        return data
    values = set(old.values()) | ({data["filter_threshold"]} if "filter_threshold" in data else set())
    if len(values) > 1:
        raise ValueError(f"conflicting negative anchor filter thresholds (theta) in the config: {old}")
    moved = {k: ({n: v for n, v in data[k].items() if n != "filter_threshold"} if k in old else v)
             for k, v in data.items()}  # fmt: skip
    moved["filter_threshold"] = values.pop()
    return moved


def refinedet320_vgg16(**changes: Any) -> RefineDetConfig:
    return RefineDetConfig(name="refinedet320_vgg16").replace(**changes)


def refinedet512_vgg16(**changes: Any) -> RefineDetConfig:
    return RefineDetConfig(name="refinedet512_vgg16", input_size=512).replace(**changes)


def refinedet320_resnet101(**changes: Any) -> RefineDetConfig:
    return RefineDetConfig(
        name="refinedet320_resnet101", backbone="resnet101", normalization=Normalization.torchvision()
    ).replace(**changes)


def refinedet512_resnet101(**changes: Any) -> RefineDetConfig:
    return RefineDetConfig(
        name="refinedet512_resnet101",
        backbone="resnet101",
        input_size=512,
        normalization=Normalization.torchvision(),
    ).replace(**changes)


PRESETS = {
    "refinedet320_vgg16": refinedet320_vgg16,
    "refinedet512_vgg16": refinedet512_vgg16,
    "refinedet320_resnet101": refinedet320_resnet101,
    "refinedet512_resnet101": refinedet512_resnet101,
}


def preset(name: str, **changes: Any) -> RefineDetConfig:
    """Look up a preset by name; raises ValueError listing the valid names."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return factory(**changes)
