"""The ``refinedet`` console script: a thin dispatcher over each package's subcommands.

Every package contributes a module with ``register(subparsers)`` that only uses argparse at import time;
heavy imports happen inside the handlers, so ``refinedet serve`` never imports training code. This module
sits on the top floor and imports those modules by name, where the import contracts see every arrow.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from conversion import cli as conversion_cli
from deploy import cli as deploy_cli
from model import cli as model_cli
from model import weights as weights_cli
from model.evaluation import cli as evaluation_cli
from model.training import cli as training_cli
from model.version import package_version
from scaleout import cli as scaleout_cli

COMMAND_MODULES = (
    model_cli,
    weights_cli,
    training_cli,
    evaluation_cli,
    conversion_cli,
    deploy_cli,
    scaleout_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinedet",
        description="RefineDet: train, evaluate, export (ONNX/TensorRT/OpenVINO) and serve a single-shot detector.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
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
