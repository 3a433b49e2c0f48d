"""``refinedet export onnx|engine|triton`` and ``refinedet verify``; ``export onnx --int8`` quantizes
for ONNX Runtime on the CPU (``conversion.quantize``).

Only argparse at import time; every handler imports its heavy modules (torch, onnx, TensorRT) itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX, a TensorRT engine or a Triton repository"
    )
    targets = export.add_subparsers(dest="target", metavar="TARGET", required=True)
    _register_onnx(targets)
    _register_engine(targets)
    _register_triton(targets)
    _register_int8_ranges(targets)
    _register_cpu(targets)
    _register_verify(subparsers)


def _register_onnx(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser("onnx", help="checkpoint -> ONNX model + manifest (<output>.json)")
    p.add_argument("--checkpoint", type=Path, help="RefineDet checkpoint (default: the shipped BCCD model)")
    p.add_argument("-o", "--output", required=True, type=Path, help="ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 11-20 (default 17)")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size K")
    p.add_argument(
        "--outputs",
        choices=("raw", "decoded"),
        default="raw",
        help="raw: the four head tensors (default); decoded: boxes_xyxy + scores, only NMS left to the runtime",
    )
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    q = p.add_argument_group("INT8 for ONNX Runtime on the CPU (static, QDQ, per-channel weights)")
    q.add_argument("--int8", action="store_true", help="quantize the exported model to INT8")
    _add_calibration_source(q)
    q.add_argument(
        "--calibration-max-images",
        type=int,
        help="calibrate on at most this many images, spread evenly over the set (default 64)",
    )
    q.add_argument(
        "--calibration-method",
        help="how activation ranges are chosen: entropy (default, the closest to FP32 on BCCD), minmax, percentile",
    )
    q.add_argument("--no-progress", action="store_true", help="INT8: no progress lines and bar on stderr")
    p.set_defaults(handler=cmd_export_onnx)


def _add_calibration_source(group) -> None:
    group.add_argument(
        "--calibration-images",
        type=Path,
        help="INT8: folder of representative images, or a VOC-layout root (then --calibration-split)",
    )
    group.add_argument(
        "--calibration-split",
        default="train",
        help="INT8, VOC root: image set in ImageSets/Main to calibrate on (default train; never the test set)",
    )


def _register_engine(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "engine", help="ONNX -> TensorRT 10 engine (.plan) + manifest; needs TensorRT and an NVIDIA GPU"
    )
    p.add_argument("--onnx", required=True, type=Path, help="ONNX model from `refinedet export onnx`")
    p.add_argument("-o", "--output", required=True, type=Path, help="engine file to write, e.g. model.plan")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16")
    _add_calibration_source(p)
    p.add_argument(
        "--calibration-cache",
        type=Path,
        help="INT8: calibration cache to read/write (default <output>.calib)",
    )
    p.add_argument("--calibration-batch-size", type=int, default=8)
    p.add_argument("--calibration-max-images", type=int, default=512)
    p.add_argument("--min-batch", type=int, help="optimization profile minimum batch (default 1)")
    p.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default: max batch)")
    p.add_argument("--max-batch", type=int, help="largest batch the engine accepts (default 16)")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument(
        "--timing-cache", type=Path, help="timing cache file, read if present and updated after the build"
    )
    p.set_defaults(handler=cmd_export_engine)


def _register_triton(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser("triton", help="Triton Inference Server model repository (config.pbtxt + model)")
    p.add_argument(
        "--onnx", required=True, type=Path, help="ONNX model from `refinedet export onnx` (dynamic batch)"
    )
    p.add_argument(
        "--plan", type=Path, help="serve this TensorRT engine (built from --onnx) instead of the ONNX model"
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="model repository directory")
    p.add_argument("--name", default="refinedet", help="model name in the repository (default refinedet)")
    p.add_argument(
        "--max-batch", type=int, help="max_batch_size (default: the engine's profile max, else 16)"
    )
    p.add_argument(
        "--max-queue-delay-us", type=int, default=2000, help="dynamic batching queue delay (default 2000)"
    )
    p.add_argument(
        "--instance-kind", choices=("cpu", "gpu"), help="instance_group kind (default: Triton decides)"
    )
    p.set_defaults(handler=cmd_export_triton)


def _register_int8_ranges(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser(
        "int8-ranges",
        help="calibrate once and store the INT8 activation ranges beside the checkpoint (no images at start-up)",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="RefineDet checkpoint")
    p.add_argument("-o", "--output", type=Path, help="default: <checkpoint name>.int8-ranges.json beside it")
    _add_calibration_source(p)
    p.add_argument("--calibration-max-images", type=int, help="default 64, spread evenly over the set")
    p.add_argument("--calibration-method", help="entropy (default), minmax or percentile")
    p.add_argument("--no-progress", action="store_true", help="no progress lines and bar on stderr")
    p.set_defaults(handler=cmd_export_int8_ranges, int8=True)


def _register_cpu(targets: argparse._SubParsersAction) -> None:
    from conversion.cpu_candidate import ALIASES, ENGINES  # standard library only

    p = targets.add_parser(
        "cpu",
        help="the fastest verified CPU engine for a checkpoint (OpenVINO / ONNX Runtime INT8 or FP32, or "
        "torch), decided once into a cache",
        description="Check every CPU engine against the checkpoint, time the verified ones and print the "
        "fastest (JSON: artifact, engine, backend, precision, reason, record). Engines: "
        + ", ".join(ENGINES)
        + ". OpenVINO runs the same .onnx files in a child process each (a crash or hang costs only that "
        "candidate) and picks its own precision (bf16 on a CPU with BF16).",
    )
    p.add_argument("--checkpoint", type=Path, help="default: the shipped checkpoint")
    p.add_argument("--cache-dir", required=True, type=Path, help="cache folder (REFINEDET_CACHE_DIR)")
    p.add_argument("--engine", choices=("auto", *ENGINES, *ALIASES), default="auto", metavar="ENGINE",
                   help="auto (default): the fastest verified (INT8 only where 1.1x faster than the rest); "
                   f"or one of {', '.join(ENGINES)} (falls back to the same runtime's FP32, then torch); "
                   f"{', '.join(f'{k} = {v}' for k, v in ALIASES.items())}")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads the serving worker will use (default: the usable cores)")  # fmt: skip
    p.add_argument(
        "--json-out",
        type=Path,
        default=None,
        help="write the decision (JSON) to this file instead of stdout (the log names the engine chosen)",
    )
    p.set_defaults(handler=cmd_export_cpu)


def cmd_export_int8_ranges(args: argparse.Namespace) -> int:
    from conversion.calibration_table import build_table, table_path_for
    from conversion.progress import StageProgress
    from model.paths import check_output_file

    output = check_output_file(args.output or table_path_for(args.checkpoint), "-o")
    options = quantize_options(args)
    assert options is not None
    with StageProgress("export int8-ranges", len(options.files), enabled=not args.no_progress) as progress:
        table = build_table(args.checkpoint, output, options, progress)
    print(f"wrote {output}: {len(table['ranges'])} ranges, {options.method} on {len(options.files)} images "
          f"of {options.source}")  # fmt: skip
    return 0


def cmd_export_cpu(args: argparse.Namespace) -> int:
    from conversion.cpu_engine import prepare_cpu_artifact
    from model.errors import UserError
    from model.logs import configure_from_env
    from model.paths import check_output_file
    from model.zoo import default_checkpoint

    # An unwritable cache is not refused: what it holds is served, else torch, the fault said in one line.
    if args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise UserError(f"--cache-dir {args.cache_dir}: is a file, not a folder")
    if args.json_out is not None:
        check_output_file(args.json_out, "--json-out")
    configure_from_env()  # `refinedet serve`'s format when it runs this at a first start
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise UserError("no --checkpoint and no shipped checkpoint")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    choice = prepare_cpu_artifact(checkpoint, args.cache_dir, engine=args.engine, threads=args.threads)
    text = json.dumps(choice.to_dict(), indent=2)
    if args.json_out is None:
        print(text)
        return 0
    from model.artifacts import atomic_write_bytes

    atomic_write_bytes(args.json_out, text.encode())  # the whole decision there; the log said which one
    return 0


def _register_verify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="compare an ONNX model or engine with its checkpoint on images")
    p.add_argument(
        "--checkpoint", type=Path, help="the artifact's source checkpoint (default: the shipped BCCD model)"
    )
    p.add_argument(
        "--artifact", required=True, type=Path, help="model.onnx or model.plan (with its .json manifest)"
    )
    p.add_argument("--images", required=True, type=Path, help="directory of images")
    p.add_argument("--device", help="cpu or cuda (default: cpu for ONNX, cuda for engines)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--max-images",
        type=int,
        default=32,
        metavar="N",
        help="check the first N images of the folder, in name order (default 32; at least 1)",
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_verify)


def quantize_options(args: argparse.Namespace):
    """``QuantizeOptions`` for ``export onnx --int8``, None without it; validated before any export."""
    from conversion.calibration import calibration_files
    from conversion.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_METHOD, QuantizeOptions
    from model.errors import UserError

    given = [
        f"--{name.replace('_', '-')}"
        for name in ("calibration_images", "calibration_max_images", "calibration_method")
        if getattr(args, name) is not None
    ]
    if not args.int8:
        if given:
            raise UserError(
                f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} with --int8"
            )
        return None
    if args.calibration_images is None:
        raise UserError("--int8 needs --calibration-images (a folder of images or a VOC-layout root)")
    count = DEFAULT_CALIBRATION_IMAGES if args.calibration_max_images is None else args.calibration_max_images
    files = calibration_files(args.calibration_images, args.calibration_split, count)
    source = str(args.calibration_images)
    if (args.calibration_images / "JPEGImages").is_dir():
        source += f" (split {args.calibration_split})"
    method = args.calibration_method or DEFAULT_METHOD
    return QuantizeOptions(files=tuple(files), source=source, method=method)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from conversion.onnx_export import check_onnx_path, check_opset, export_checkpoint, parse_batch
    from model.zoo import shipped_checkpoint

    check_artifact_output(
        check_onnx_path(args.output)
    )  # every option is checked before the checkpoint is read
    check_opset(args.opset)
    batch = parse_batch(args.batch)
    int8 = quantize_options(args)
    checkpoint = args.checkpoint or shipped_checkpoint()
    export = {"opset": args.opset, "batch": batch, "outputs": args.outputs, "simplify": args.simplify}
    if int8 is None:
        manifest = export_checkpoint(checkpoint, args.output, **export)
    else:
        from conversion.progress import StageProgress
        from conversion.quantize import export_int8

        with StageProgress("export onnx", len(int8.files), enabled=not args.no_progress) as progress:
            manifest = export_int8(checkpoint, args.output, int8, progress=progress, **export)
    c = manifest.config
    print(
        f"wrote {args.output} and {args.output}.json: {c.name}, input {c.input_size}, {len(c.class_names)} classes, "
        f"opset {manifest.onnx_opset}, batch {batch or 'dynamic'}, outputs {manifest.outputs}, {manifest.precision}"
    )
    if int8 is not None:
        calibration = manifest.extra["int8"]["calibration"]
        print(
            f"INT8: {calibration['method']} calibration on {calibration['images']} images of {calibration['source']}"
        )
    for warning in manifest.extra.get("tracer_warnings", []):
        print(f"tracer warning: {warning}", file=sys.stderr)
    return 0


def check_artifact_output(path: Path, option: str = "-o") -> Path:
    """An artifact and its manifest (``<path>.json``) can both be written."""
    from model.artifacts import manifest_path
    from model.paths import check_output_file

    check_output_file(path, option)
    check_output_file(manifest_path(path), option)
    return path


def engine_options(args: argparse.Namespace):
    """Validate the engine arguments without TensorRT (pure; tested)."""
    from conversion.calibration import calibration_files
    from conversion.tensorrt_build import EngineOptions, read_onnx_manifest, resolve_profile
    from model.paths import check_output_file

    check_artifact_output(args.output)
    for flag, path in (
        ("--calibration-cache", args.calibration_cache),
        ("--timing-cache", args.timing_cache),
    ):
        if path is not None:
            check_output_file(path, flag)
    onnx = read_onnx_manifest(args.onnx)
    profile = resolve_profile(onnx.batch, args.min_batch, args.opt_batch, args.max_batch)
    files: tuple[Path, ...] = ()
    if args.calibration_images is not None:
        if args.precision != "int8":
            raise ValueError("--calibration-images only applies to --precision int8")
        files = tuple(
            calibration_files(args.calibration_images, args.calibration_split, args.calibration_max_images)
        )
    cache = args.calibration_cache
    if args.precision == "int8" and cache is None:
        cache = args.output.with_name(args.output.name + ".calib")
    return EngineOptions(
        precision=args.precision,
        profile=profile,
        workspace_gib=args.workspace,
        timing_cache=args.timing_cache,
        calibration_files=files,
        calibration_cache=cache,
        calibration_batch_size=args.calibration_batch_size,
    )


def cmd_export_engine(args: argparse.Namespace) -> int:
    from conversion.tensorrt_build import build_engine

    options = engine_options(args)
    manifest = build_engine(args.onnx, args.output, options)
    t = manifest.tensorrt
    assert t is not None
    print(
        f"wrote {args.output} and {args.output}.json: {manifest.precision}, batch {t.min_batch}/{t.opt_batch}/{t.max_batch}, "
        f"{t.gpu_name} (sm {t.compute_capability}), TensorRT {t.tensorrt_version}"
    )
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from conversion.triton import export_triton
    from model.paths import check_output_dir

    check_output_dir(args.output, "-o")
    path = export_triton(
        args.onnx,
        args.output,
        args.plan,
        args.name,
        args.max_batch,
        args.max_queue_delay_us,
        args.instance_kind,
    )
    print(f"wrote Triton model {path} (config.pbtxt, 1/{'model.plan' if args.plan else 'model.onnx'})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from conversion.verify import image_batches, image_files, verify_artifact
    from model.artifacts import read_manifest
    from model.checkpoint import file_sha256, load_model
    from model.devices import resolve_device
    from model.errors import UserError
    from model.paths import check_output_file
    from model.runtime import load_runner
    from model.zoo import shipped_checkpoint

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = image_files(args.images, args.max_images)  # any count: the runner pads a fixed batch
    if args.json is not None:
        check_output_file(args.json, "--json")
    manifest = read_manifest(args.artifact)
    device = resolve_device(args.device or ("cuda" if manifest.kind == "tensorrt" else "cpu"))
    args.checkpoint = args.checkpoint or shipped_checkpoint()
    model, _ = load_model(args.checkpoint)
    if model.config != manifest.config:
        raise UserError(f"{args.checkpoint} and {args.artifact} describe different models (configs differ)")
    if manifest.source_checkpoint_sha256 not in (None, file_sha256(args.checkpoint)):
        print(
            f"note: {args.artifact} was exported from another checkpoint file (hash differs)", file=sys.stderr
        )
    runner = load_runner(args.artifact, device=device)
    batches = image_batches(files, runner.config.input_size, runner.config.normalization, args.batch_size)
    with tqdm(total=len(files), desc="verify", unit="img", disable=args.no_progress) as bar:

        def counted() -> Iterator[Tensor]:
            for batch in batches:
                yield batch
                bar.update(batch.shape[0])

        report = verify_artifact(model, runner, counted(), str(args.artifact))
    print(report.format())
    if args.json:
        from model.artifacts import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return 0 if report.passed else 1
