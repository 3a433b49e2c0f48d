"""What a training run is: ``TrainOptions``, a frozen record stored in every checkpoint it writes.

The CLI builds it from argparse; ``--resume`` rebuilds it from the checkpoint so the run continues
with the same data, model and schedule (only the ``RUNTIME_FIELDS`` may change on resume).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from model.errors import UserError

PAPER_ITERATIONS = 120_000
PAPER_STEPS = (80_000, 100_000)  # lr x0.1 at these iterations of the paper's 120k (VOC07+12)

# may differ between a run and its resumption; everything else must match the checkpoint
RUNTIME_FIELDS = frozenset(
    {
        "workers",
        "device",
        "output",
        "checkpoint_every",
        "log_every",
        "eval_every",
        "eval_batch_size",
        "progress",
        "amp",
        "deterministic",
    }
)


@dataclass(frozen=True)
class TrainOptions:
    preset: str = "refinedet320_vgg16"
    data: tuple[str, ...] = ()  # VOC roots, joined
    coco_images: str | None = None
    coco_ann: str | None = None
    split: str = "trainval"
    classes: tuple[str, ...] | None = None
    input_size: int | None = None
    normalization: str | None = None  # "caffe" | "torchvision" | None (the preset's)
    ablation: tuple[str, ...] = ()  # subset of {"negative_filtering", "cascade", "tcb"} switched off
    pretrained: str = "none"  # "imagenet" | a weights file | "none"
    batch_size: int = 32  # global: split evenly across processes
    iterations: int | None = None
    epochs: int | None = None
    lr: float = 1e-3
    lr_steps: tuple[int, ...] | None = None  # default: the paper's 80k/100k of 120k, scaled
    warmup: int = 0  # iterations of linear warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: float | None = None
    augment: bool = True
    seed: int = 0
    workers: int = 4
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = False
    deterministic: bool = False  # deterministic cuDNN / oneDNN kernels: bit-identical reruns and resumes
    output: str | None = None
    checkpoint_every: int = 2000
    log_every: int = 20
    val_split: str | None = None
    eval_every: int = 0  # 0: evaluate only at the end (when val_split is set)
    eval_batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if bool(self.data) == bool(self.coco_ann or self.coco_images):
            raise UserError(
                "give either --data (PASCAL VOC roots) or --coco-images with --coco-ann, not both or neither"
            )
        if (self.coco_ann is None) != (self.coco_images is None):
            raise UserError("--coco-images and --coco-ann go together")
        if self.iterations is not None and self.epochs is not None:
            raise UserError("give --iterations or --epochs, not both")
        for name in ("batch_size", "iterations", "epochs", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.workers < 0 or self.warmup < 0 or self.eval_every < 0:
            raise UserError("--workers, --warmup and --eval-every cannot be negative")
        if self.eval_every and not self.val_split:
            raise UserError("--eval-every needs --val-split (the split to evaluate on)")
        if self.normalization not in (None, "caffe", "torchvision"):
            raise UserError(f"--normalization must be caffe or torchvision, got {self.normalization!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        unknown = set(self.ablation) - {"negative_filtering", "cascade", "tcb"}
        if unknown:
            raise UserError(f"unknown ablation switches {sorted(unknown)}")

    def replace(self, **changes: Any) -> TrainOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in dataclasses.fields(TrainOptions)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known
        }
        return TrainOptions(**values)

    def resumed(self, overrides: dict[str, Any]) -> TrainOptions:
        """These (stored) options with the user's explicit ``overrides`` for a resumed run; a change
        to anything but ``RUNTIME_FIELDS`` is refused, since the run would no longer be the same."""
        changed = {k: v for k, v in overrides.items() if getattr(self, k) != v}
        fixed = sorted(set(changed) - RUNTIME_FIELDS)
        if fixed:
            details = ", ".join(
                f"--{k.replace('_', '-')} {changed[k]!r} (checkpoint: {getattr(self, k)!r})" for k in fixed
            )
            raise UserError(
                f"--resume continues the run stored in the checkpoint; these options differ from it: {details}. "
                "Leave them out (or start a new run from the weights with --pretrained)"
            )
        return self.replace(**changed)


def default_workers() -> int:
    """Data-loading processes: all cores but two (the training process launches the GPU work and
    needs its own core), at most 12. On a 16-core H100 machine 8 workers deliver ~930 img/s and 15
    ~1540 img/s of augmented 320x320 batches, above the ~550 img/s the training step consumes."""
    return max(0, min(12, (os.cpu_count() or 1) - 2))
