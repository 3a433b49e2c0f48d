"""Decide what to serve and make it exist: the step between "a model file" and a running server.

``refinedet serve`` (and so the container, whose command it is) calls ``prepare(settings)`` with the
service's own ``Settings``, then serves what it returns. With ``backend auto``:

- a TensorRT engine is served as it is (CUDA);
- on a GPU, an ONNX model or checkpoint becomes a TensorRT engine built once into the cache under a key
  made of everything an engine is bound to (``conversion.engine_cache``); later starts and other replicas
  reuse it. If no engine can be had (no GPU, no TensorRT, a build error) one log line says why and ONNX
  Runtime serves the ONNX model (CUDA provider when available), else torch the checkpoint;
- on a CPU, a checkpoint becomes the fastest artifact that keeps its accuracy (``conversion.cpu_engine``:
  INT8 ONNX quantized from the ranges table shipped beside the checkpoint, where this CPU gains from it
  and it agrees with the checkpoint; else FP32 ONNX; else the checkpoint on torch), decided once per
  checkpoint, CPU and thread count into the cache (docs/benchmarks.md); an ONNX model is served as it is.

``--backend torch`` serves a checkpoint eagerly without any export. What kind a model file is comes from
the project's one table, ``model.artifacts.file_kind``. Exports and builds run as ``refinedet export ...``
subprocesses, so a TensorRT crash cannot take the server down with it; probes and builders are
injectable (``deploy.host.Probes``, ``Builders``).

Cache layout (``REFINEDET_CACHE_DIR``)::

    onnx/<checkpoint sha256[:16]>/model.onnx (+ model.onnx.json)
    engines/<key>.plan (+ <key>.plan.json, <key>.lock)
    timing/<gpu>-sm<cc>-trt<version>.cache
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from conversion.engine_cache import build_once, engine_cache_key, plan_path, timing_cache_path
from deploy import host
from deploy.host import Builders, Probes
from model.artifacts import file_kind
from model.errors import UserError
from service.settings import Settings

log = logging.getLogger("refinedet.deploy")


class EngineUnavailable(Exception):
    """No TensorRT engine can be had here; the message says why (shown in the fallback log line)."""


class Deployment(NamedTuple):
    """What the server is started with; ``onnx`` is the ONNX model behind it, when there is one."""

    artifact: Path | None  # None: no model anywhere, the server builds an untrained network
    backend: str  # tensorrt | onnxruntime | torch
    device: str  # cuda | cpu
    onnx: Path | None = None

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with the model, backend and device this deployment decided."""
        return settings.model_copy(
            update={"model": self.artifact, "backend": self.backend, "device": self.device}
        )


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


def cached_onnx(checkpoint: Path, settings: Settings, builders: Builders) -> Path:
    """The ONNX export of ``checkpoint`` in the cache, exported on first use."""
    final = settings.cache_dir / "onnx" / _sha256(checkpoint)[:16] / "model.onnx"

    def export(out: Path) -> None:
        log.info("exporting %s to ONNX (once per checkpoint)", checkpoint)
        builders.export_onnx(checkpoint, out)

    return build_once(final, export, settings.engine_lock_timeout_s, "ONNX model")


def cpu_engine(checkpoint: Path, settings: Settings, builders: Builders) -> Deployment:
    """The fastest CPU artifact for ``checkpoint`` that keeps its accuracy (``conversion.cpu_engine``:
    INT8 ONNX where this CPU gains from it and it passes the agreement check, else FP32 ONNX, else the
    checkpoint on torch), decided and built once per checkpoint, CPU and thread count into the cache.
    If even that step fails, torch serves the checkpoint, with the reason logged."""
    try:
        choice = builders.prepare_cpu(checkpoint, settings.cache_dir, settings.engine_threads())
    except UserError:
        raise
    except Exception as exc:
        log.warning("CPU engine preparation failed (%s: %s); serving %s with torch", type(exc).__name__, exc,
                    checkpoint)  # fmt: skip
        return Deployment(checkpoint, "torch", "cpu")
    log.info("CPU engine: %s (%s)", choice.engine, choice.reason)
    onnx = choice.artifact if choice.backend == "onnxruntime" else None
    return Deployment(choice.artifact, choice.backend, "cpu", onnx)


def ensure_engine(onnx: Path, settings: Settings, probes: Probes, builders: Builders) -> Path:
    """The cached engine for this ONNX model, GPU, TensorRT version, precision and batch; built if absent.
    Raises EngineUnavailable with the reason when there is no GPU, no TensorRT, or the build fails."""
    gpu = probes.gpu()
    if gpu is None:
        raise EngineUnavailable("no CUDA GPU visible (start the container with a GPU reservation / --gpus)")
    trt_version = probes.tensorrt_version()
    if trt_version is None:
        raise EngineUnavailable("the TensorRT Python package is not installed")
    key = engine_cache_key(
        _sha256(onnx),
        gpu.name,
        gpu.compute_capability,
        trt_version,
        settings.precision,
        settings.batch_limit("cuda"),
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
            settings.batch_limit("cuda"),
        )
        timing.parent.mkdir(parents=True, exist_ok=True)
        builders.build_engine(onnx, out, settings.precision, settings.batch_limit("cuda"), timing)

    try:
        return build_once(final, build, settings.engine_lock_timeout_s, "TensorRT engine")
    except Exception as exc:
        raise EngineUnavailable(f"engine build failed ({type(exc).__name__}: {exc})") from exc


def fallback(onnx: Path | None, checkpoint: Path | None, device: str, probes: Probes) -> Deployment:
    """ONNX Runtime (with its CUDA provider when ``device`` is cuda and the provider is there), else torch
    on the checkpoint (or, with no model at all, on the untrained network the server builds). On a GPU
    where onnxruntime has no CUDA provider, torch on CUDA serves the checkpoint rather than ONNX Runtime
    on the CPU."""
    if onnx is not None:
        providers = probes.onnxruntime_providers()
        if providers is not None:
            cuda = device == "cuda" and "CUDAExecutionProvider" in providers and probes.gpu() is not None
            gpu_torch = device == "cuda" and not cuda and checkpoint is not None and probes.torch_cuda()
            if not gpu_torch:  # a GPU is better used by torch than left idle by a CPU-only onnxruntime
                return Deployment(onnx, "onnxruntime", "cuda" if cuda else "cpu", onnx)
        if checkpoint is None:
            raise UserError(
                f"cannot serve {onnx} without onnxruntime: install refinedet[serve] or give a checkpoint"
            )
    cuda = device == "cuda" and probes.torch_cuda()
    return Deployment(checkpoint, "torch", "cuda" if cuda else "cpu", onnx)


def wanted_device(settings: Settings, probes: Probes) -> str:
    """cuda or cpu: ``settings.device``, with auto meaning cuda when a GPU is visible."""
    if settings.device != "auto":
        return settings.device
    return "cuda" if probes.gpu() is not None else "cpu"


def prepare(settings: Settings, probes: Probes | None = None, builders: Builders | None = None) -> Deployment:
    """Decide what to serve and make it exist: an engine on a GPU when possible, an ONNX export on a
    CPU, else a logged fallback. Raises UserError for a missing or unusable model."""
    probes, builders = probes or Probes(), builders or Builders()
    model = resolve_model(settings.model)
    if model is None:
        log.warning(
            "no model: REFINEDET_MODEL is unset and no default checkpoint ships in this build; "
            "serving an UNTRAINED network with torch (set REFINEDET_MODEL to a .pth, .onnx or .plan)"
        )
        return fallback(None, None, wanted_device(settings, probes), probes)
    kind = file_kind(model)
    if kind == "tensorrt":
        if settings.backend not in ("auto", "tensorrt") or settings.device == "cpu":
            raise UserError(f"{model} is a TensorRT engine: it runs with backend tensorrt on a CUDA GPU only")
        return Deployment(model, "tensorrt", "cuda")
    checkpoint = model if kind == "checkpoint" else None
    device = wanted_device(settings, probes)
    if settings.backend == "torch":
        if checkpoint is None:
            raise UserError(f"backend torch needs a checkpoint (.pth), got {model}")
        return fallback(None, checkpoint, device, probes)
    if checkpoint is not None and device == "cpu" and settings.backend == "auto":
        return cpu_engine(checkpoint, settings, builders)
    try:
        onnx = model if checkpoint is None else cached_onnx(model, settings, builders)
    except UserError as exc:  # the file itself is unusable (e.g. not a checkpoint): torch would fail too
        raise UserError(f"ONNX export of {model} failed: {exc}") from exc
    except Exception as exc:
        if settings.backend != "auto":
            raise UserError(f"ONNX export of {model} failed: {exc}") from exc
        log.warning(
            "ONNX export failed (%s: %s); falling back to torch with %s", type(exc).__name__, exc, model
        )
        return fallback(None, checkpoint, device, probes)
    if settings.backend == "onnxruntime" or device == "cpu":
        return fallback(onnx, checkpoint, device, probes)
    try:
        return Deployment(ensure_engine(onnx, settings, probes, builders), "tensorrt", "cuda", onnx)
    except EngineUnavailable as exc:
        if settings.backend == "tensorrt":
            raise UserError(f"backend tensorrt but no engine: {exc}") from exc
        chosen = fallback(onnx, checkpoint, device, probes)
        log.warning("TensorRT unavailable: %s; falling back to %s on %s", exc, chosen.backend, chosen.device)
        return chosen
