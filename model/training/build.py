"""Builders for a training run: device, data sets, model config, data loader, optimizer.

Everything is derived from ``TrainOptions`` (and, on resume, the checkpoint's config), so the trainer
only wires the pieces together.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import torch

from model.config import Ablation, Normalization, RefineDetConfig, preset
from model.data import COCODetection, EvalTransform, TrainAugmentation, VOCDetection
from model.data.records import DetectionDataset
from model.errors import UserError
from model.training.distributed import DistContext
from model.training.options import TrainOptions
from model.training.sampler import AugmentedSamples, TrainBatchSampler, pack_batch


def resolve_device(name: str, ctx_local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible (use --device cpu)")
    if name == "cuda":
        return torch.device("cuda", ctx_local_rank)
    return torch.device(name)


def open_train_set(options: TrainOptions, class_names: tuple[str, ...] | None = None) -> DetectionDataset:
    """The training data set (no transform: the loader applies the augmentation)."""
    names = class_names or options.classes
    if options.coco_ann:
        dataset: DetectionDataset = COCODetection(options.coco_images, options.coco_ann)  # type: ignore[arg-type]
        if names is not None and tuple(dataset.class_names) != tuple(names):
            raise UserError(f"--classes {names} differ from the COCO categories {dataset.class_names}")
        return dataset
    return VOCDetection(options.data, options.split, class_names=names)


def open_val_set(options: TrainOptions, class_names: tuple[str, ...]) -> DetectionDataset:
    """The validation split of the same VOC roots, opened with the model's classes."""
    if options.coco_ann:
        raise UserError("periodic evaluation (--val-split) is available for PASCAL VOC data (--data)")
    return VOCDetection(options.data, options.val_split or "val", class_names=class_names)


def build_config(options: TrainOptions, class_names: tuple[str, ...]) -> RefineDetConfig:
    changes: dict[str, Any] = {"class_names": class_names}
    if options.input_size is not None:
        changes["input_size"] = options.input_size
    if options.normalization == "caffe":
        changes["normalization"] = Normalization()
    elif options.normalization == "torchvision":
        changes["normalization"] = Normalization.torchvision()
    if options.ablation:
        changes["ablation"] = Ablation(**{name: False for name in options.ablation})
    try:
        return preset(options.preset, **changes)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def mean_rgb(norm: Normalization) -> tuple[float, float, float]:
    """The normalisation mean as an RGB 0-255 colour (the expand canvas fill)."""
    mean = [m / norm.scale for m in norm.mean]
    if norm.channel_order == "BGR":
        mean = mean[::-1]
    return mean[0], mean[1], mean[2]


def build_loader(
    dataset: DetectionDataset,
    config: RefineDetConfig,
    options: TrainOptions,
    ctx: DistContext,
    start_iteration: int,
    device: torch.device,
) -> tuple[torch.utils.data.DataLoader, TrainBatchSampler]:
    """An endless loader of this process's ``PackedBatch`` es from ``start_iteration`` on."""
    if options.batch_size % ctx.world_size:
        raise UserError(
            f"--batch-size {options.batch_size} (global) must divide evenly over {ctx.world_size} processes"
        )
    transform = (
        TrainAugmentation(config.input_size, mean_rgb(config.normalization))
        if options.augment
        else EvalTransform(config.input_size)
    )
    sampler = TrainBatchSampler(
        len(dataset),
        options.batch_size // ctx.world_size,
        options.seed,
        ctx.rank,
        ctx.world_size,
        start_iteration,
    )
    workers = options.workers
    loader = torch.utils.data.DataLoader(
        AugmentedSamples(dataset, transform),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=pack_batch,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(options.seed),  # leaves the global RNG untouched
    )
    return loader, sampler


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops cleanly and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )


def load_pretrained(model: torch.nn.Module, source: str) -> dict[str, Any] | None:
    """Backbone initialisation per ``--pretrained``; returns the weights report (None for "none")."""
    if source == "none":
        return None
    from model.weights import WeightsError, load_backbone_weights

    try:
        return load_backbone_weights(model, source)  # type: ignore[arg-type]
    except WeightsError as exc:
        raise UserError(f"--pretrained {source}: {exc}") from None


def config_summary(config: RefineDetConfig) -> dict[str, Any]:
    return {
        "preset": config.name,
        "input_size": config.input_size,
        "classes": list(config.class_names),
        "normalization": dataclasses.asdict(config.normalization),
        "ablation": dataclasses.asdict(config.ablation),
    }
