"""``refinedet train``: argparse only here; the trainer is imported when the command runs.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m refinedet train ...`` (``--batch-size`` is
the global batch, split over the processes).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

ABLATIONS = {"no_negative_filtering": "negative_filtering", "no_cascade": "cascade", "no_tcb": "tcb"}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated iterations, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train RefineDet on PASCAL VOC or COCO data (resumable; torchrun for several GPUs)",
        description="Train RefineDet. Defaults follow the paper: SGD momentum 0.9, weight decay 5e-4, batch 32, "
        "lr 1e-3 x0.1 at 2/3 and 5/6 of the run (80k/100k of 120k), SSD augmentation.",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        action="append",
        metavar="ROOT",
        help="PASCAL VOC root (repeat to join, e.g. VOC2007 and VOC2012)",
    )
    data.add_argument("--coco-images", metavar="DIR", help="COCO images folder (with --coco-ann)")
    data.add_argument("--coco-ann", metavar="JSON", help="COCO instances JSON (with --coco-images)")
    data.add_argument("--split", help="VOC split to train on (default trainval)")
    data.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="class names in label order (default: found in the data, sorted)",
    )
    data.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const=False,
        help="plain resize, no augmentation",
    )
    data.add_argument(
        "--workers", type=int, help="data-loading processes (default: CPU cores - 2, at most 12)"
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", help="model preset (default refinedet320_vgg16)")
    m.add_argument("--input-size", type=int, help="override the preset's input size (a multiple of 64)")
    m.add_argument(
        "--normalization", choices=("caffe", "torchvision"), help="input contract (default: the preset's)"
    )
    m.add_argument(
        "--pretrained", metavar="SRC", help="backbone init: imagenet, a weights file, or none (default none)"
    )
    for flag in ABLATIONS:
        m.add_argument(
            f"--{flag.replace('_', '-')}", action="store_true", help=f"ablation: switch off {ABLATIONS[flag]}"
        )
    s = p.add_argument_group("schedule")
    s.add_argument("--batch-size", type=int, help="global batch size (default 32)")
    length = s.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=int, help="optimizer steps (default 120000)")
    length.add_argument("--epochs", type=int, help="passes over the training set, instead of --iterations")
    s.add_argument("--lr", type=float, help="base learning rate (default 1e-3)")
    s.add_argument(
        "--lr-steps",
        type=_int_list,
        metavar="IT,IT",
        help="iterations of the x0.1 drops (default 2/3, 5/6 of the run)",
    )
    s.add_argument("--warmup", type=int, metavar="N", help="linear lr warm-up iterations (default 0)")
    s.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--output", metavar="DIR", help="run folder (default runs/<preset>-<time>)")
    r.add_argument(
        "--resume", metavar="CKPT", help="continue the run in this last.pth exactly where it stopped"
    )
    r.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="write last.pth every N iterations (default 2000)"
    )
    r.add_argument("--log-every", type=int, metavar="N", help="metrics row every N iterations (default 20)")
    r.add_argument("--val-split", help="VOC split to evaluate on; the best mAP is kept as best.pth")
    r.add_argument(
        "--eval-every", type=int, metavar="N", help="evaluate every N iterations (default: at the end)"
    )
    r.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default 16)")
    r.add_argument("--device", help="auto, cpu, cuda (default auto)")
    r.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="no bf16 autocast on CUDA")
    r.add_argument("--channels-last", action="store_const", const=True, help="channels-last memory format")
    r.add_argument(
        "--deterministic",
        action="store_const",
        const=True,
        help="deterministic kernels: bit-identical reruns/resumes, slower",
    )
    r.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, help="no progress bar"
    )
    p.set_defaults(handler=cmd_train)


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainOptions`` fields the user set on the command line."""
    from model.training.options import TrainOptions

    fields = set(TrainOptions.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for key in ("data", "classes"):
        if key in given:
            given[key] = tuple(given[key])
    switched_off = tuple(name for flag, name in ABLATIONS.items() if getattr(args, flag))
    if switched_off:
        given["ablation"] = switched_off
    return given


@contextlib.contextmanager
def _plain_dataset_warnings() -> Iterator[None]:
    """Print data set warnings as one ``refinedet train: warning: ...`` line (no source line)."""
    from model.data import DatasetWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DatasetWarning):
            print(f"refinedet train: warning: {message}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def check_paths(args: argparse.Namespace) -> None:
    """The files and folders named on the command line, before any data or model loads."""
    from pathlib import Path

    from model.errors import UserError
    from model.paths import check_output_dir

    if args.output is not None:
        check_output_dir(args.output)
    if args.pretrained not in (None, "imagenet", "none") and not Path(args.pretrained).is_file():
        raise UserError(f"--pretrained {args.pretrained}: no such file (or give imagenet or none)")


def cmd_train(args: argparse.Namespace) -> int:
    from model.training.options import TrainOptions, default_workers
    from model.training.trainer import Trainer

    check_paths(args)
    given = explicit_options(args)
    with _plain_dataset_warnings():
        if args.resume:
            trainer = Trainer(None, args.resume, given)
        else:
            given.setdefault("workers", default_workers())
            trainer = Trainer(TrainOptions(**given))
        result = trainer.run()
    if not trainer.ctx.is_main:
        return 0
    status = "stopped" if result.interrupted else "finished"
    print(
        f"{status} at iteration {result.iteration}/{result.iterations} in {result.seconds:.1f} s; checkpoint {result.checkpoint}"
    )
    if result.best:
        print(
            f"best val mAP {result.best['mAP']:.4f} at iteration {result.best['iteration']} ({result.output / 'best.pth'})"
        )
    if result.interrupted:
        print(f"continue with: refinedet train --resume {result.checkpoint}")
        return 130
    return 0
