"""The ``refinedet`` console script: a thin dispatcher over each package's subcommands.

Every package contributes a module with ``register(subparsers)`` that only uses argparse at import
time; heavy imports happen inside the handlers, so ``refinedet serve`` never imports training code.
The modules are found by name, so ``model`` does not import ``conversion`` or ``service``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from model.version import package_version

COMMAND_MODULES = (
    "model.cli",
    "model.weights",
    "model.training.cli",
    "model.evaluation.cli",
    "conversion.cli",
    "deploy.cli",
    "scaleout.cli",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print a preset's input size, feature maps, anchors, parameters")
    p.add_argument("preset", help="preset name, e.g. refinedet320_vgg16")
    p.add_argument(
        "--num-classes", type=int, default=None, help="object classes (without background); default 20 (VOC)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from model.config import preset

    changes = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise ValueError("--num-classes must be at least 1")
        changes["class_names"] = tuple(f"class{i}" for i in range(args.num_classes))
    config = preset(args.preset, **changes)  # a bad name is reported before torch is imported

    from model.network import build_model, feature_map_sizes

    model = build_model(config)
    info = {
        "preset": config.name,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "num_classes": config.num_classes,
        "feature_maps": feature_map_sizes(model),
        "anchors_per_location": config.anchors.anchors_per_location,
        "num_anchors": int(model.anchors.shape[0]),
        "num_parameters": model.num_parameters(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:22s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinedet",
        description="RefineDet: train, evaluate, export (ONNX/TensorRT) and serve a single-shot detector.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that package is not part of this install
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from model.errors import UserError

    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("REFINEDET_DEBUG"):
            raise
        print(f"refinedet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
