"""Container entrypoint: find the model, export ONNX, build or reuse the TensorRT engine, exec the server.

A TensorRT engine only runs on the GPU model, TensorRT version and precision it was built for, so the
image cannot ship one. On first start ``prepare`` builds it into the cache volume under a key made of
exactly those inputs (``conversion.engine_cache``); later starts and other replicas reuse it. If no
engine can be had (no GPU, no TensorRT, a build error) it logs one line saying why and falls back to
ONNX Runtime (CUDA provider when available), then torch. ``main`` then execs ``refinedet serve``.

Cache layout (``REFINEDET_CACHE_DIR``)::

    onnx/<checkpoint sha256[:16]>/model.onnx (+ model.onnx.json)
    engines/<key>.plan (+ <key>.plan.json, <key>.lock)
    timing/<gpu>-sm<cc>-trt<version>.cache

Exports and builds run as ``refinedet export ...`` subprocesses, so a TensorRT crash cannot take the
entrypoint down with it. GPU, TensorRT and builder functions are injectable (``Probes``, ``Builders``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from conversion import deploy_host as host
from conversion.deploy_host import Builders, Probes
from conversion.engine_cache import build_once, engine_cache_key, plan_path, timing_cache_path
from model.errors import UserError

log = logging.getLogger("refinedet.deploy")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
ENGINE_PRECISIONS = ("fp16", "fp32")
CHECKPOINT_SUFFIXES = (".pth", ".pt")
ENGINE_SUFFIXES = (".plan", ".engine")


class EngineUnavailable(Exception):
    """No TensorRT engine can be had here; the message says why (shown in the fallback log line)."""


class Deployment(NamedTuple):
    """What the server is started with; ``onnx`` is the ONNX model behind it, when there is one."""

    artifact: Path | None  # None: no model anywhere, the server builds an untrained network
    backend: str  # tensorrt | onnxruntime | torch
    device: str  # cuda | cpu
    onnx: Path | None = None


@dataclass(frozen=True)
class DeploySettings:
    """Entrypoint configuration, read once from the environment by ``from_env``."""

    cache_dir: Path  # REFINEDET_CACHE_DIR, else ~/.cache/refinedet
    model: Path | None = None  # None: the checkpoint shipped in the package
    backend: str = "auto"
    device: str | None = None  # None: cuda when a GPU is visible
    precision: str = "fp16"
    max_batch: int = 8
    lock_timeout_s: float = 1800.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DeploySettings:
        def number(name: str, default: float, kind: type) -> float:
            raw = env.get(name, "").strip()
            try:
                value = kind(raw) if raw else default
            except ValueError:
                raise UserError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise UserError(f"{name} must be positive, got {raw}")
            return value

        backend = env.get("REFINEDET_BACKEND", "auto").strip().lower() or "auto"
        device: str | None = env.get("REFINEDET_DEVICE", "").strip().lower()
        device = None if device in ("", "auto") else device
        precision = env.get("REFINEDET_PRECISION", "fp16").strip().lower() or "fp16"
        if backend not in BACKENDS:
            raise UserError(f"REFINEDET_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}")
        if device not in (None, "cpu", "cuda"):
            raise UserError(f"REFINEDET_DEVICE={device!r}: choose auto, cpu or cuda")
        if precision not in ENGINE_PRECISIONS:
            raise UserError(
                f"REFINEDET_PRECISION={precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}"
            )
        model = env.get("REFINEDET_MODEL", "").strip()
        default_cache = Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "refinedet"
        return cls(
            model=Path(model) if model else None,
            backend=backend,
            device=device,
            cache_dir=Path(env.get("REFINEDET_CACHE_DIR") or default_cache),
            precision=precision,
            max_batch=int(number("REFINEDET_MAX_BATCH_SIZE", 8, int)),
            lock_timeout_s=number("REFINEDET_ENGINE_LOCK_TIMEOUT_S", 1800.0, float),
        )


def artifact_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    raise UserError(f"{path}: unknown model type; REFINEDET_MODEL must end in .pth, .onnx or .plan")


def resolve_model(model: Path | None) -> Path | None:
    """REFINEDET_MODEL, else the checkpoint shipped in the package, else None (the server then builds an
    untrained network, as ``refinedet serve`` does without a model)."""
    model = model or host.default_checkpoint()
    if model is not None and not model.is_file():
        raise UserError(f"model not found: {model} (check REFINEDET_MODEL and the models volume)")
    return model


def _sha256(path: Path) -> str:
    from model.checkpoint import file_sha256

    return file_sha256(path)


def cached_onnx(checkpoint: Path, settings: DeploySettings, builders: Builders) -> Path:
    """The ONNX export of ``checkpoint`` in the cache, exported on first use."""
    final = settings.cache_dir / "onnx" / _sha256(checkpoint)[:16] / "model.onnx"

    def export(out: Path) -> None:
        log.info("exporting %s to ONNX (once per checkpoint)", checkpoint)
        builders.export_onnx(checkpoint, out)

    return build_once(final, export, settings.lock_timeout_s, "ONNX model")


def ensure_engine(onnx: Path, settings: DeploySettings, probes: Probes, builders: Builders) -> Path:
    """The cached engine for this ONNX model, GPU, TensorRT version, precision and batch; built if absent.
    Raises EngineUnavailable with the reason when there is no GPU, no TensorRT, or the build fails."""
    gpu = probes.gpu()
    if gpu is None:
        raise EngineUnavailable("no CUDA GPU visible (start the container with a GPU reservation / --gpus)")
    trt_version = probes.tensorrt_version()
    if trt_version is None:
        raise EngineUnavailable("the TensorRT Python package is not installed")
    key = engine_cache_key(
        _sha256(onnx), gpu.name, gpu.compute_capability, trt_version, settings.precision, settings.max_batch
    )
    final = plan_path(settings.cache_dir, key)
    timing = timing_cache_path(settings.cache_dir, gpu.name, gpu.compute_capability, trt_version)

    def build(out: Path) -> None:
        log.info(
            "building TensorRT %s engine for %s (sm %s, TensorRT %s, max batch %d); this takes minutes, once",
            settings.precision,
            gpu.name,
            gpu.compute_capability,
            trt_version,
            settings.max_batch,
        )
        timing.parent.mkdir(parents=True, exist_ok=True)
        builders.build_engine(onnx, out, settings.precision, settings.max_batch, timing)

    try:
        return build_once(final, build, settings.lock_timeout_s, "TensorRT engine")
    except Exception as exc:
        raise EngineUnavailable(f"engine build failed ({type(exc).__name__}: {exc})") from exc


def fallback(
    onnx: Path | None, checkpoint: Path | None, settings: DeploySettings, probes: Probes
) -> Deployment:
    """ONNX Runtime (CUDA provider when present and wanted), else torch on the checkpoint (or, with no
    model at all, on the untrained network the server builds)."""
    if onnx is not None:
        providers = probes.onnxruntime_providers()
        if providers is not None:
            cuda = (
                settings.device != "cpu" and "CUDAExecutionProvider" in providers and probes.gpu() is not None
            )
            return Deployment(onnx, "onnxruntime", "cuda" if cuda else "cpu", onnx)
        if checkpoint is None:
            raise UserError(
                f"cannot serve {onnx} without onnxruntime: install refinedet[serve] or give a checkpoint"
            )
    cuda = settings.device != "cpu" and probes.torch_cuda()
    return Deployment(checkpoint, "torch", "cuda" if cuda else "cpu", onnx)


def prepare(
    settings: DeploySettings, probes: Probes | None = None, builders: Builders | None = None
) -> Deployment:
    """Decide what to serve and make it exist: an engine when possible, else a logged fallback."""
    probes, builders = probes or Probes(), builders or Builders()
    model = resolve_model(settings.model)
    if model is None:
        log.warning(
            "no model: REFINEDET_MODEL is unset and no default checkpoint ships in this build; "
            "serving an UNTRAINED network with torch (set REFINEDET_MODEL to a .pth, .onnx or .plan)"
        )
        return fallback(None, None, settings, probes)
    kind = artifact_kind(model)
    if kind == "engine":
        return Deployment(model, "tensorrt", "cuda")
    checkpoint = model if kind == "checkpoint" else None
    if settings.backend == "torch":
        if checkpoint is None:
            raise UserError(f"REFINEDET_BACKEND=torch needs a checkpoint (.pth), got {model}")
        return fallback(None, checkpoint, settings, probes)
    try:
        onnx = model if checkpoint is None else cached_onnx(model, settings, builders)
    except Exception as exc:
        if settings.backend != "auto":
            raise UserError(f"ONNX export of {model} failed: {exc}") from exc
        log.warning(
            "ONNX export failed (%s: %s); falling back to torch with %s", type(exc).__name__, exc, model
        )
        return fallback(None, checkpoint, settings, probes)
    if settings.backend == "onnxruntime" or settings.device == "cpu":
        return fallback(onnx, checkpoint, settings, probes)
    try:
        return Deployment(ensure_engine(onnx, settings, probes, builders), "tensorrt", "cuda", onnx)
    except EngineUnavailable as exc:
        if settings.backend == "tensorrt":
            raise UserError(f"REFINEDET_BACKEND=tensorrt but no engine: {exc}") from exc
        chosen = fallback(onnx, checkpoint, settings, probes)
        log.warning("TensorRT unavailable: %s; falling back to %s on %s", exc, chosen.backend, chosen.device)
        return chosen


def serve_command(deployment: Deployment, extra: Sequence[str] = ()) -> list[str]:
    model = [] if deployment.artifact is None else ["--model", str(deployment.artifact)]
    return [
        "refinedet",
        "serve",
        *model,
        "--backend",
        deployment.backend,
        "--device",
        deployment.device,
        *extra,
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="print the decision as JSON instead of serving"
    )
    parser.add_argument(
        "--check-ready", action="store_true", help="exit 0 if GET /readyz answers 200 (HEALTHCHECK)"
    )
    parser.add_argument(
        "--triton-repo", type=Path, default=None, help="write a Triton repository here and exit"
    )
    parser.add_argument(
        "serve_args", nargs=argparse.REMAINDER, help="extra `refinedet serve` arguments after --"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("deploy-entrypoint", help="container entrypoint: prepare the model, then serve")
    add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s refinedet-deploy %(levelname)s %(message)s")
    if args.check_ready:
        return host.check_ready(os.environ)
    deployment = prepare(DeploySettings.from_env())
    if args.triton_repo is not None:
        host.run_export_triton(deployment, args.triton_repo)
        return 0
    extra = [a for a in args.serve_args if a != "--"]
    command = serve_command(deployment, extra)
    if args.dry_run:
        print(json.dumps({**deployment._asdict(), "command": command}, default=str))
        return 0
    log.info("exec %s", shlex.join(command))
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 1  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.deploy", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as exc:
        print(f"refinedet deploy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
