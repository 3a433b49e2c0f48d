"""``refinedet serve``: run the detection service with uvicorn.

Every option is also an environment variable (``--max-batch-size`` <-> ``REFINEDET_MAX_BATCH_SIZE``);
options given here win. Only argparse is imported at import time.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--model",
        {
            "help": "checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.plan); default: the project's default"
        },
    ),
    (
        "--backend",
        {"choices": ["auto", "tensorrt", "onnxruntime", "torch"], "help": "default auto: by artifact type"},
    ),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "default auto: cuda when available"}),
    ("--host", {"help": "bind address (default 127.0.0.1; 0.0.0.0 in containers)"}),
    ("--port", {"type": int, "help": "default 8000"}),
    ("--workers", {"type": int, "help": "uvicorn worker processes, each with its own model (default 1)"}),
    ("--max-batch-size", {"type": int, "help": "largest dynamic batch (default 8 on a GPU, 2 on the CPU)"}),
    (
        "--max-delay-ms",
        {"type": float, "help": "longest wait for a batch to fill (default 0: run when the engine is free)"},
    ),
    ("--max-queue-size", {"type": int, "help": "queued images beyond this get 503 (default 64)"}),
    (
        "--gpu-decode",
        {
            "choices": ["auto", "on", "off"],
            "help": "decode JPEG uploads in the engine, batched (nvJPEG on CUDA); default auto: on with CUDA",
        },
    ),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve detections over HTTP (FastAPI + uvicorn)",
        description="Serve a RefineDet model over HTTP. Every option is also settable as REFINEDET_<OPTION> "
        "(e.g. REFINEDET_MODEL, REFINEDET_API_KEY, REFINEDET_ENABLE_BENCHMARK); see docs for the full list.",
    )
    for flag, kwargs in OPTIONS:
        p.add_argument(flag, default=None, **kwargs)
    p.add_argument("--enable-benchmark", action="store_true", default=None, help="allow POST /v1/benchmark")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    p.set_defaults(handler=cmd_serve)


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


def to_env(overrides: dict[str, Any]) -> dict[str, str]:
    """Command-line overrides as REFINEDET_* variables, for worker processes that read the environment."""
    from service.server import env_values

    return env_values(overrides)


def announce(choice: Any, default: bool) -> None:
    if choice.artifact is None:
        bar = "!" * 78
        print(
            f"{bar}\n  refinedet serve: NO TRAINED DEFAULT CHECKPOINT EXISTS YET.\n"
            "  Serving an UNTRAINED refinedet320_vgg16 (random weights, classes RBC, WBC, Platelets):\n"
            "  its detections are meaningless. Use --model PATH with a trained checkpoint/ONNX/engine.\n"
            f"{bar}",
            file=sys.stderr,
        )
    else:
        what = f"{choice.artifact} (the project's default model)" if default else str(choice.artifact)
        print(f"refinedet serve: serving {what} with {choice.backend} on {choice.device}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    settings = settings_from(overrides)
    from service.backends import resolve_backend

    choice = resolve_backend(settings)  # fail fast with a clear message, before uvicorn starts
    announce(choice, default=settings.model is None)
    from service.server import run

    run(settings, json_logs=not args.plain_logs)
    return 0
