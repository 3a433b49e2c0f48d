"""``refinedet eval``, and the options and run of ``refinedet predict`` (registered by ``deploy.cli``, which
decides its engine). Only argparse at import time; work happens in handlers."""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model.devices import check_batch_device, resolve_device

METRICS = ("voc07", "voc12", "coco")
# predict lists up to this many inputs up front (~1 s: a bar with a total and an ETA); more stream uncounted
COUNT_LIMIT = 100_000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint or an exported model: VOC07/VOC12 AP or COCO AP, per class"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", help="checkpoint written by `refinedet train` (default: the shipped BCCD model)"
    )
    source.add_argument(
        "--artifact",
        help="exported model (model.onnx, model.int8.onnx, model.plan) with its .json manifest",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="ROOT",
        help="PASCAL VOC-layout root (Annotations/, JPEGImages/, ImageSets/Main/); repeatable",
    )
    p.add_argument("--split", default="test", help="image set in ImageSets/Main (default: test)")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="voc07",
        help="voc07: 11-point AP; voc12: area AP; coco: COCOeval AP@[.5:.95] (default: voc07)",
    )
    p.add_argument("--coco-images", help="COCO image folder (with --coco-ann, instead of --data)")
    p.add_argument("--coco-ann", help="COCO instances JSON (with --coco-images)")
    p.add_argument(
        "--multiscale", action="store_true", help="the paper's multi-scale + flip test with box voting"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1 ... (default: cuda if available; for --artifact: cpu for ONNX, cuda for engines)",
    )
    p.add_argument(
        "--output",
        help="folder for results.json and PR plots, checked before the evaluation runs "
        "(default: runs/eval/<model file>-<split>-<metric>)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detection score threshold (default: the model's, 0.01 unless changed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_eval)


def add_predict_arguments(q: argparse.ArgumentParser) -> None:
    """The options ``refinedet predict`` and ``refinedet ray-predict`` share (both registered above this
    package, where the engine is decided: ``deploy.cli``, ``scaleout.cli``)."""
    q.add_argument(
        "images", nargs="*", metavar="IMAGES", help="image files and/or folders (walked recursively)"
    )
    q.add_argument(
        "--list",
        action="append",
        default=[],
        metavar="FILE",
        help="a file with one image path per line (repeatable)",
    )
    source = q.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", help="checkpoint written by `refinedet train` (default: the shipped BCCD model)"
    )
    source.add_argument("--artifact", help="exported model (model.onnx, model.plan) with its .json manifest")
    q.add_argument(
        "--output", default="predictions", help="output folder, new or a run to resume (default: predictions)"
    )
    q.add_argument(
        "--score-threshold", type=float, default=0.5, help="keep detections above this (default 0.5)"
    )
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--threads", type=int, default=2, help="image decoding threads (default 2)")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto: cuda if available)")
    q.add_argument("--annotate", action="store_true", help="also write annotated JPEGs to OUTPUT/annotated/")
    q.add_argument("--overwrite", action="store_true", help="start over instead of resuming OUTPUT")
    q.add_argument(
        "--retry-errors", action="store_true", help="on resume, run the images that had errors again"
    )
    q.add_argument(
        "--no-progress",
        action="store_true",
        help=f"no progress bar (the bar has a total and an ETA for up to {COUNT_LIMIT:,} inputs)",
    )


def _check_options(args: argparse.Namespace) -> None:
    from model.errors import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold < 1.0:
        raise UserError(f"--score-threshold must lie in [0, 1), got {args.score_threshold}")


def check_data_options(args: argparse.Namespace) -> None:
    """The data set options make sense and name existing folders (checked before the model loads)."""
    from model.errors import UserError

    coco = args.coco_images or args.coco_ann
    if coco and args.data:
        raise UserError("give either --data or --coco-images/--coco-ann, not both")
    if coco and not (args.coco_images and args.coco_ann):
        raise UserError("--coco-images and --coco-ann go together")
    if not coco and not args.data:
        raise UserError("give --data ROOT (VOC layout) or --coco-images DIR --coco-ann FILE")
    for root in args.data:
        if not Path(root).is_dir():
            raise UserError(f"--data {root}: not a folder (expected a PASCAL VOC-layout root)")


def open_dataset(args: argparse.Namespace, class_names: tuple[str, ...]) -> Any:
    """The evaluation data set named by the options (VOC roots or a COCO folder + JSON)."""
    from model.errors import UserError

    dataset: Any
    check_data_options(args)
    if args.coco_images:
        from model.data.coco import COCODetection

        dataset = COCODetection(args.coco_images, args.coco_ann)
    else:
        from model.data.voc import VOCDetection

        dataset = VOCDetection(args.data, args.split, class_names=class_names, keep_difficult=True)
    if len(dataset) == 0:
        raise UserError("the evaluation data set has no images")
    if tuple(dataset.class_names) != tuple(class_names):
        raise UserError(
            f"the data set's classes {tuple(dataset.class_names)} differ from the model's {class_names}"
        )
    return dataset


def load_evaluated(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(model or ArtifactNetwork, device, what to record about it) for ``--checkpoint`` / ``--artifact``."""
    from model.checkpoint import file_sha256, load_model
    from model.errors import UserError

    if not args.artifact:
        from model.zoo import shipped_checkpoint

        args.checkpoint = args.checkpoint or str(shipped_checkpoint())
        device = resolve_device(args.device)  # a bad --device is reported before the model loads
        model, _ = load_model(args.checkpoint)
        return (
            model,
            device,
            {"checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(args.checkpoint)},
        )
    from model.artifacts import read_manifest
    from model.evaluation.artifact import load_artifact_network

    if args.multiscale:
        raise UserError("--multiscale needs --checkpoint: an exported model runs at its input size only")
    manifest = read_manifest(args.artifact)
    name = args.device
    if name == "auto":
        name = "cuda" if manifest.kind == "tensorrt" else "cpu"
    device = resolve_device(name)
    record = {
        "artifact": args.artifact,
        "artifact_sha256": manifest.artifact_sha256,
        "artifact_kind": manifest.kind,
        "precision": manifest.precision,
        "source_checkpoint_sha256": manifest.source_checkpoint_sha256,
    }
    return load_artifact_network(args.artifact, device), device, record


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from model.evaluation.report import format_table, plot_pr_curves, write_json
    from model.evaluation.runner import evaluate_coco, evaluate_voc

    _check_options(args)
    check_data_options(args)
    output = eval_output(args)  # before the evaluation: its results must not be lost for a bad --output
    model, device, source = load_evaluated(args)
    config = model.config
    dataset = open_dataset(args, config.class_names)
    postprocess = config.postprocess
    if args.score_threshold is not None:
        postprocess = dataclasses.replace(postprocess, score_threshold=args.score_threshold)
    options = {
        "device": device,
        "batch_size": args.batch_size,
        "postprocess": postprocess,
        "multiscale": args.multiscale,
        "progress": not args.no_progress,
    }
    start = time.perf_counter()
    if args.metric == "coco":
        result = evaluate_coco(model, dataset, **options)
    else:
        result = evaluate_voc(model, dataset, use_07_metric=args.metric == "voc07", **options)
    seconds = time.perf_counter() - start
    result.update(
        {
            **source,
            "model": config.name,
            "input_size": config.input_size,
            "data": args.data or [args.coco_images, args.coco_ann],
            "split": args.split,
            "multiscale": args.multiscale,
            "score_threshold": postprocess.score_threshold,
            "device": str(device),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(dataset) / seconds, 3),
        }
    )
    if result.get("summary"):
        print(result["summary"])
    print(format_table(result))
    json_path = write_json(output / "results.json", result)
    plots = plot_pr_curves(result, output)
    print(f"{len(dataset)} images in {seconds:.1f} s ({len(dataset) / seconds:.2f} images/s) on {device}")
    print(f"results: {json_path}; precision-recall plots: {len(plots)} PNG in {output}")
    return 0


def eval_output(args: argparse.Namespace) -> Path:
    """``--output`` or its default (named after the model file), checked to be a folder we can write."""
    from model.paths import check_output_dir, check_output_file
    from model.zoo import shipped_checkpoint

    stem = Path(args.checkpoint or args.artifact or shipped_checkpoint()).stem
    output = check_output_dir(args.output or Path("runs/eval") / f"{stem}-{args.split}-{args.metric}")
    check_output_file(output / "results.json")
    return output


def check_predict_options(args: argparse.Namespace) -> None:
    """Usage errors of ``predict`` / ``ray-predict``, before anything loads; no model given means the
    shipped one (``args.checkpoint`` is set to it)."""
    from model.errors import UserError
    from model.evaluation.predict import IMAGE_SUFFIXES, iter_inputs
    from model.paths import check_output_dir
    from model.zoo import shipped_checkpoint

    _check_options(args)
    if not args.images and not args.list:
        raise UserError("give image files, folders or --list FILE")
    for path in args.images:
        if not Path(path).exists():
            raise UserError(f"{path}: no such image file or folder")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    check_output_dir(args.output)
    check_batch_device(args.device)  # a bad --device is reported before anything loads
    if not args.checkpoint and not args.artifact:
        args.checkpoint = str(shipped_checkpoint())
    if next(iter_inputs(args.images, args.list), None) is None:  # stops at the first image found
        where = ", ".join([*args.images, *(f"--list {f}" for f in args.list)])
        suffixes = "/".join(sorted(s[1:] for s in IMAGE_SUFFIXES))
        raise UserError(f"no images found in {where} (looked for {suffixes} files, in subfolders too)")


def listed_inputs(images: list[str], lists: list[str], limit: int = COUNT_LIMIT) -> list[str] | Iterator[str]:
    """Every input path as a list when there are at most ``limit`` (one pass over the folders and list
    files: a total for the bar), else an iterator: the first ``limit`` then the rest, lazily."""
    from model.evaluation.predict import iter_inputs

    stream = iter_inputs(images, lists)
    head = list(itertools.islice(stream, limit + 1))
    return head if len(head) <= limit else itertools.chain(head, stream)


def predict_source(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(what run.json records about the model, its config) without building the network. No model given:
    the shipped checkpoint (``args.checkpoint`` is set to it)."""
    if not args.artifact:
        from model.checkpoint import file_sha256, read_checkpoint
        from model.config import RefineDetConfig
        from model.zoo import shipped_checkpoint

        args.checkpoint = args.checkpoint or str(shipped_checkpoint())
        config = RefineDetConfig.from_dict(read_checkpoint(args.checkpoint)["config"])
        source = {"checkpoint_path": str(Path(args.checkpoint).absolute())}
        return {**source, "checkpoint_sha256": file_sha256(args.checkpoint)}, config
    from model.artifacts import read_manifest

    manifest = read_manifest(args.artifact)
    source = {"artifact_path": str(Path(args.artifact).absolute())}
    return {**source, "artifact_sha256": manifest.artifact_sha256}, manifest.config


def predict_run_record(args: argparse.Namespace, source: dict[str, Any], config: Any) -> dict[str, Any]:
    """What ``run.json`` records, and what a resumed run must match (``predict`` and ``ray-predict`` alike)."""
    return {
        **source,
        "model": config.name,
        "class_names": list(config.class_names),
        "class_id": "0-based index into class_names",
        "score_threshold": args.score_threshold,
        "annotate": getattr(args, "annotate", False),
    }


def run_predict(args: argparse.Namespace, engine: Callable[[], tuple[Any, str]]) -> int:
    """``refinedet predict`` once its options are checked (``deploy.cli``): ``engine()`` decides and builds the
    engine plan's network (a checkpoint's, or an exported artifact's runner) and names its device; it is
    called only when there are images left to do."""
    from tqdm import tqdm

    from model.evaluation.predict import ImagePredictor, PredictionLog, predict_files

    files = listed_inputs(args.images, args.list)
    source, config = predict_source(args)
    log = PredictionLog(
        args.output, predict_run_record(args, source, config), args.overwrite, args.retry_errors
    )
    total = sum(f not in log.done for f in files) if isinstance(files, list) else None
    if total == 0 and isinstance(files, list):  # a resumed run with nothing left to do: no model to load
        log.close()
        print(f"0 images to do, {len(files)} already done; rows in {log.path}")
        return 0
    model, device = engine()
    predictor = ImagePredictor(model, device, args.score_threshold)
    bar = tqdm(total=total, desc="predict", unit="img", disable=args.no_progress)
    start = time.perf_counter()
    try:
        counts = predict_files(
            predictor,
            files,
            log,
            args.batch_size,
            args.threads,
            Path(args.output) / "annotated" if args.annotate else None,
            on_batch=lambda rows: bar.update(len(rows)),
        )
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - start
    print(
        f"{counts['images']} images in {seconds:.1f} s on {device} ({counts['errors']} errors), "
        f"{counts['skipped']} already done; rows in {log.path}"
    )
    return 0
