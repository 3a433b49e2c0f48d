"""``refinedet serve``, ``refinedet prepare`` and ``refinedet healthcheck``.

``serve`` is the one way to start the service, on a laptop and in the containers alike: the options
become the service's ``Settings`` (every option is also ``REFINEDET_<OPTION>``; options win), then
``deploy.prepare`` makes the artifact to serve exist, then ``service.server.run`` serves it.
``prepare`` does only the first two (to warm the cache ahead of time, or to see the decision), and
``healthcheck`` is the container HEALTHCHECK. Only argparse is imported at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

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
            "help": "default auto: a TensorRT engine on a GPU, ONNX Runtime on a CPU (the checkpoint is "
            "exported once into the cache); torch: serve a checkpoint eagerly",
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

    from model.errors import UserError
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


def announce(deployment: Any, default: bool) -> None:
    if deployment.artifact is None:
        bar = "!" * 78
        print(
            f"{bar}\n  refinedet serve: NO TRAINED DEFAULT CHECKPOINT EXISTS YET.\n"
            "  Serving an UNTRAINED refinedet320_vgg16 (random weights, classes RBC, WBC, Platelets):\n"
            "  its detections are meaningless. Use --model PATH with a trained checkpoint/ONNX/engine.\n"
            f"{bar}",
            file=sys.stderr,
        )
        return
    what = str(deployment.artifact)
    if default:
        what = (
            f"{what} (built from the project's default model)"
            if deployment.onnx
            else f"{what} (the project's default model)"
        )
    print(
        f"refinedet serve: serving {what} with {deployment.backend} on {deployment.device}", file=sys.stderr
    )


def _prepared(args: argparse.Namespace):
    from deploy.prepare import prepare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s refinedet-deploy %(levelname)s %(message)s")
    settings = settings_from(overrides_from(args))
    deployment = prepare(settings)
    return settings, deployment


def cmd_serve(args: argparse.Namespace) -> int:
    settings, deployment = _prepared(args)
    announce(deployment, default=settings.model is None)
    from service.server import run

    run(deployment.apply(settings), json_logs=not args.plain_logs)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    _, deployment = _prepared(args)
    if args.triton_repo is not None:
        from pathlib import Path

        from deploy.host import run_export_triton

        run_export_triton(deployment, Path(args.triton_repo))
    print(json.dumps(deployment._asdict(), default=str))
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from deploy.host import check_ready

    port = args.port if args.port is not None else settings_from({}).port
    return check_ready(port)
