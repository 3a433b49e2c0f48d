"""``refinedet serve``, ``refinedet prepare`` and ``refinedet healthcheck``.

``serve`` is the one way to start the service, on a laptop and in the containers alike: the options
become the service's ``Settings`` (every option is also ``REFINEDET_<OPTION>``; options win), then
``deploy.prepare`` decides the engine plan and makes its artifact exist, then ``service.server.run``
serves exactly that plan. ``prepare`` does only the first two (to warm the cache ahead of time, or to see
the decision), ``predict`` runs the same plan over image files, and ``healthcheck`` is the container
HEALTHCHECK. Only argparse is imported at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.errors import UserError

OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--model",
        {
            "help": "checkpoint (.pth, .pth.xz), ONNX model (.onnx) or TensorRT engine (.plan); "
            "default: the project's shipped model"
        },
    ),
    (
        "--backend",
        {
            "choices": ["auto", "tensorrt", "onnxruntime", "openvino", "torch"],
            "help": "default auto: a TensorRT engine on a GPU; on a CPU the fastest engine verified against "
            "the checkpoint (OpenVINO / ONNX Runtime, INT8 or FP32, or torch), decided once into the cache; "
            "torch: serve a checkpoint eagerly",
        },
    ),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "default auto: cuda when available"}),
    ("--cache-dir", {"help": "where exports and engines are kept (default ~/.cache/refinedet)"}),
    ("--host", {"help": "bind address (default 127.0.0.1; 0.0.0.0 in containers)"}),
    ("--port", {"type": int, "help": "default 8000"}),
    ("--workers", {"type": int, "help": "uvicorn worker processes, each with its own model (default 1)"}),
    (
        "--max-batch-size",
        {"type": int, "help": "largest dynamic batch (default 8 on a GPU, 1 on a CPU)"},
    ),
    (
        "--max-delay-ms",
        {"type": float, "help": "longest wait for a batch to fill (default 0: run when the engine is free)"},
    ),
    ("--max-queue-size", {"type": int, "help": "queued images beyond this get 503 (default 64)"}),
    (
        "--engine-decode",
        {
            "choices": ["auto", "on", "off"],
            "help": "decode uploads in the engine (nvJPEG on CUDA, PIL in the engine slots on a CPU) rather than "
            "in the handler; default auto: yes (on: fail if nvJPEG does not work; off: the handler decodes)",
        },
    ),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
)
PREPARE_OPTIONS = ("--model", "--backend", "--device", "--cache-dir", "--max-batch-size")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve detections over HTTP (prepares the model first: ONNX export / TensorRT engine, cached)",
        description="Serve a RefineDet model over HTTP. Every option is also settable as REFINEDET_<OPTION> "
        "(e.g. REFINEDET_MODEL, REFINEDET_API_KEY, REFINEDET_ENABLE_BENCHMARK); see service/README.md.",
    )
    for flag, kwargs in OPTIONS:
        serve.add_argument(flag, default=None, **kwargs)
    serve.add_argument(
        "--enable-benchmark", action="store_true", default=None, help="allow POST /v1/benchmark"
    )
    serve.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    serve.add_argument(
        "--plan-out", default=None, metavar="FILE", help="also write the full engine decision (JSON) to FILE"
    )
    serve.set_defaults(handler=cmd_serve)

    prepare = subparsers.add_parser(
        "prepare",
        help="make the artifact `serve` would serve exist (export, engine build) and print the decision",
        description="Run the preparation step of `refinedet serve` alone: useful to warm the cache volume "
        "ahead of a rollout (a Kubernetes init container) or to see what would be served.",
    )
    for flag, kwargs in OPTIONS:
        if flag in PREPARE_OPTIONS:
            prepare.add_argument(flag, default=None, **kwargs)
    prepare.add_argument("--triton-repo", default=None, help="also write a Triton model repository here")
    prepare.set_defaults(handler=cmd_prepare)

    predict = subparsers.add_parser(
        "predict",
        help="detect objects on image files, folders or list files; one JSONL row per image, resumable",
        description="Streams any number of images through the engine `refinedet serve` would run here (on "
        "a CPU the fastest verified one, from the same cache) and appends one row per image to "
        "OUTPUT/detections.jsonl (a bad image is an error row). Rerunning with the same OUTPUT skips the "
        "images already there. class_id is the 0-based index into the model's class_names.",
    )
    from model.evaluation.cli import add_predict_arguments

    add_predict_arguments(predict)
    predict.set_defaults(handler=cmd_predict)

    health = subparsers.add_parser(
        "healthcheck",
        help="exit 0 when this host's service answers GET /readyz with 200 (container HEALTHCHECK)",
    )
    health.add_argument("--port", type=int, default=None, help="default: REFINEDET_PORT, else 8000")
    health.set_defaults(handler=cmd_healthcheck)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as Settings field names."""
    names = [flag[2:].replace("-", "_") for flag, _ in OPTIONS] + ["enable_benchmark"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def settings_from(overrides: dict[str, Any]):
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(
            f"invalid settings ({problems}); check the options and REFINEDET_* variables"
        ) from None


def announce(plan: Any, default: bool) -> None:
    """One short summary of what is served, on stderr (the whole plan: ``refinedet prepare``, ``--plan-out``)."""
    if plan.artifact is None:
        from model.zoo import DEFAULT_CLASSES

        bar = "!" * 78
        print(
            f"{bar}\n  refinedet serve: NO TRAINED DEFAULT CHECKPOINT EXISTS YET.\n"
            f"  Serving an UNTRAINED refinedet320_vgg16 (random weights, classes {', '.join(DEFAULT_CLASSES)}):\n"
            "  its detections are meaningless. Use --model PATH with a trained checkpoint/ONNX/engine.\n"
            f"{bar}",
            file=sys.stderr,
        )
        return
    origin = " (from the project's default model)" if default else ""
    print(f"refinedet serve: {plan.summary()}{origin}", file=sys.stderr)


def configure_logging(level: str, json_logs: bool) -> None:
    """The service's log format (``model.logs``) for the preparation step and its subprocesses too: one
    format from start to end."""
    from model.logs import configure

    configure(level, json_logs)


def _prepared(args: argparse.Namespace, json_logs: bool = False, check: Any = None):
    """(settings, the engine plan); ``check(settings)`` runs first, before anything is exported or built."""
    from deploy.prepare import prepare

    settings = settings_from(overrides_from(args))
    if check is not None:
        check(settings)
    configure_logging(settings.log_level, json_logs)
    return settings, prepare(settings)


def write_plan(plan: Any, path: str) -> None:
    from model.artifacts import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(plan.to_dict(), indent=1) + "\n").encode())


def cmd_serve(args: argparse.Namespace) -> int:
    from model.paths import check_output_file
    from service.server import check_port

    if args.plan_out is not None:
        check_output_file(args.plan_out, "--plan-out")
    # A taken port is reported before a first start's export, not minutes later.
    settings, plan = _prepared(args, not args.plain_logs, check=lambda s: check_port(s.host, s.port))
    announce(plan, default=settings.model is None)
    if args.plan_out is not None:
        write_plan(plan, args.plan_out)
    from service.server import run

    run(settings, plan, json_logs=not args.plain_logs)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.triton_repo is not None:
        from model.paths import check_output_dir

        check_output_dir(args.triton_repo, "--triton-repo")
    _, plan = _prepared(args)
    if args.triton_repo is not None:
        from deploy.host import run_export_triton

        run_export_triton(plan, Path(args.triton_repo))
    print(json.dumps(plan.to_dict(), indent=1))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``refinedet predict``: the options checked, the engine plan decided (``deploy.prepare``), the rows written
    (``model.evaluation.cli.run_predict``)."""
    from deploy.prepare import plan_for_files
    from model.evaluation.cli import check_predict_options, run_predict
    from model.runtime.plan import build_network

    check_predict_options(args)

    def engine() -> tuple[Any, str]:
        plan = plan_for_files(args.checkpoint or args.artifact, args.device, args.batch_size)
        print(f"refinedet predict: {plan.summary()}", file=sys.stderr)
        return build_network(plan), plan.device

    return run_predict(args, engine)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from deploy.host import check_ready

    port = args.port if args.port is not None else settings_from({}).port
    return check_ready(port)
