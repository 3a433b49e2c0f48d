"""Decide what to run and make it exist: the one place that turns settings and this machine into an
``EnginePlan`` (``model.runtime.plan``: artifact, engine, backend, device, precision, batch, engine slots,
threads, who decodes uploads).

``refinedet serve`` (and so the container, whose command it is), ``refinedet prepare``, the Ray Serve
replicas, ``refinedet predict`` and the Ray Data actors all call ``prepare(settings)`` and build exactly the
plan it returns; on a Ray cluster each replica or actor calls it on its own node, so each node gets the
decision for its own hardware (from the cache when another process on that node, or one sharing the cache
volume, already made it). With ``backend auto``:

- a TensorRT engine is served as it is (CUDA);
- on a GPU, an ONNX model or checkpoint becomes a TensorRT engine built once into the cache under a key
  made of everything an engine is bound to (``conversion.engine_cache``); later starts and other replicas
  reuse it, or rebuild it when it no longer matches its manifest's sha256 (truncated, bit-flipped). If no engine can be had (no GPU, no TensorRT, a build error) one log line says why and ONNX
  Runtime serves the ONNX model (CUDA provider when available), else torch the checkpoint;
- on a CPU, a checkpoint becomes the fastest artifact that keeps its accuracy (``conversion.cpu_engine``:
  INT8 ONNX quantized from the ranges table shipped beside the checkpoint, where this CPU gains from it
  and it agrees with the checkpoint; else FP32 ONNX; else the checkpoint on torch), decided once per
  checkpoint, CPU and thread count into the cache (docs/benchmarks.md); an ONNX model is served as it is.

``--backend torch`` serves a checkpoint eagerly without any export. The hardware is probed here only
(``deploy.host.Probes``); the serving knobs per device (batch, slots, threads, decoding) come from
``Settings.serving_for``. What kind a model file is comes from
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

from conversion.engine_cache import build_once, engine_cache_key, plan_path, timing_cache_path
from deploy import host
from deploy.host import Builders, Probes
from model.artifacts import file_kind, read_manifest
from model.devices import check_batch_device
from model.errors import UserError
from model.runtime.plan import EnginePlan
from service.settings import Settings

log = logging.getLogger("refinedet.deploy")


class EngineUnavailable(Exception):
    """No TensorRT engine can be had here; the message says why (shown in the fallback log line)."""


def plan(
    settings: Settings,
    artifact: Path | None,
    backend: str,
    device: str,
    precision: str,
    onnx: Path | None = None,
    reason: str = "",
    engine: str | None = None,
) -> EnginePlan:
    """The plan for serving ``artifact`` with ``backend`` on ``device``, with the settings' knobs for it."""
    knobs = settings.serving_for(device)
    return EnginePlan(
        artifact, backend, device, engine or f"{backend}-{precision}", precision,  # type: ignore[arg-type]
        knobs.max_batch, knobs.slots, knobs.threads, knobs.decode, onnx, reason,  # type: ignore[arg-type]
    )  # fmt: skip


def resolve_model(model: Path | None) -> Path | None:
    """REFINEDET_MODEL, else the checkpoint shipped in the package, else None (the server then builds an
    untrained network, as ``refinedet serve`` does without a model)."""
    model = model or host.default_checkpoint()
    if model is not None and not model.is_file():
        raise UserError(f"model not found: {model} (check the path, REFINEDET_MODEL and the models volume)")
    return model


def _sha256(path: Path) -> str:
    from model.checkpoint import file_sha256

    return file_sha256(path)


def _artifact_precision(path: Path) -> str:
    """The precision an exported artifact's manifest records; raises ``ArtifactError`` (a ``UserError``) for
    a file that is not a RefineDet artifact (no manifest, or another file's), so a wrong model fails here,
    once, instead of in every server start."""
    return read_manifest(path).precision


def _torch_precision(settings: Settings, device: str) -> str:
    return "fp16" if device == "cuda" and settings.fp16 else "fp32"


def cached_onnx(checkpoint: Path, settings: Settings, builders: Builders) -> Path:
    """The ONNX export of ``checkpoint`` in the cache, exported on first use."""
    final = settings.cache_dir / "onnx" / _sha256(checkpoint)[:16] / "model.onnx"

    def export(out: Path) -> None:
        log.info("exporting %s to ONNX (once per checkpoint)", checkpoint)
        builders.export_onnx(checkpoint, out)

    return build_once(final, export, settings.engine_lock_timeout_s, "ONNX model", read_manifest)


def cpu_engine(checkpoint: Path, settings: Settings, builders: Builders) -> EnginePlan:
    """The fastest CPU engine for ``checkpoint`` that keeps its accuracy (``conversion.cpu_engine``: each
    candidate verified against the checkpoint and timed), decided and built once per checkpoint, CPU and
    thread count into the cache. If even that step fails, torch serves the checkpoint, with the reason."""
    try:
        threads = settings.serving_for("cpu").threads or 1
        choice = builders.prepare_cpu(checkpoint, settings.cache_dir, threads)
    except UserError:
        raise
    except Exception as exc:
        why = f"CPU engine preparation failed ({type(exc).__name__}: {exc})"
        log.warning("%s; serving %s with torch", why, checkpoint)
        return plan(settings, checkpoint, "torch", "cpu", "fp32", reason=why)
    if choice.fault:  # the cache could not hold a faster engine: why, what is served, the fix
        log.warning("CPU engine: %s", choice.fault)
    else:
        log.info("CPU engine: %s (%s)", choice.engine, choice.reason)
    onnx = choice.artifact if choice.backend != "torch" else None
    return plan(settings, choice.artifact, choice.backend, "cpu", choice.precision, onnx, choice.reason,
                engine=choice.engine)  # fmt: skip


def ensure_engine(onnx: Path, settings: Settings, probes: Probes, builders: Builders) -> Path:
    """The cached engine for this ONNX model, GPU, TensorRT version, precision and batch; built if absent.
    Raises EngineUnavailable with the reason when there is no GPU, no TensorRT, or the build fails."""
    gpu = probes.gpu()
    if gpu is None:
        raise EngineUnavailable("no CUDA GPU visible (start the container with a GPU reservation / --gpus)")
    trt_version = probes.tensorrt_version()
    if trt_version is None:
        raise EngineUnavailable("the TensorRT Python package is not installed")
    max_batch = settings.serving_for("cuda").max_batch
    key = engine_cache_key(
        _sha256(onnx), gpu.name, gpu.compute_capability, trt_version, settings.precision, max_batch
    )
    final = plan_path(settings.cache_dir, key)
    timing = timing_cache_path(settings.cache_dir, gpu.name, gpu.compute_capability, trt_version)

    def build(out: Path) -> None:
        log.info(
            "building TensorRT %s engine for %s (sm %s, TensorRT %s, max batch %d); this takes minutes, once",
            settings.precision, gpu.name, gpu.compute_capability, trt_version, max_batch,
        )  # fmt: skip
        timing.parent.mkdir(parents=True, exist_ok=True)
        builders.build_engine(onnx, out, settings.precision, max_batch, timing)

    try:
        return build_once(final, build, settings.engine_lock_timeout_s, "TensorRT engine", read_manifest)
    except Exception as exc:
        raise EngineUnavailable(f"engine build failed ({type(exc).__name__}: {exc})") from exc


def fallback(
    settings: Settings,
    onnx: Path | None,
    checkpoint: Path | None,
    device: str,
    probes: Probes,
    reason: str = "",
) -> EnginePlan:
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
                where = "cuda" if cuda else "cpu"
                return plan(settings, onnx, "onnxruntime", where, _artifact_precision(onnx), onnx, reason)
        if checkpoint is None:
            raise UserError(
                f"cannot serve {onnx} without onnxruntime: install refinedet[serve] or give a checkpoint"
            )
    where = "cuda" if device == "cuda" and probes.torch_cuda() else "cpu"
    return plan(settings, checkpoint, "torch", where, _torch_precision(settings, where), onnx, reason)


def wanted_device(settings: Settings, probes: Probes) -> str:
    """cuda or cpu: ``settings.device``, with auto meaning cuda when a GPU is visible. ``cuda`` on a machine
    without a visible GPU is refused (a CPU fallback would serve slower than asked for, silently)."""
    if settings.device == "cpu":
        return "cpu"
    gpu = probes.gpu() is not None
    if settings.device == "cuda" and not gpu:
        raise UserError("--device cuda but no CUDA GPU is visible here; use --device cpu (or auto)")
    return "cuda" if gpu else "cpu"


def prepare(settings: Settings, probes: Probes | None = None, builders: Builders | None = None) -> EnginePlan:
    """Decide what to run and make it exist: an engine on a GPU when possible, the fastest verified CPU
    engine on a CPU, else a logged fallback. Raises UserError for a missing or unusable model."""
    probes, builders = probes or Probes(), builders or Builders()
    model = resolve_model(settings.model)
    device = wanted_device(settings, probes)
    if model is None:
        log.warning(
            "no model: REFINEDET_MODEL is unset and no default checkpoint ships in this build; "
            "serving an UNTRAINED network with torch (set REFINEDET_MODEL to a .pth, .onnx or .plan)"
        )
        return fallback(settings, None, None, device, probes, "no model: an untrained network")
    kind = file_kind(model)
    if kind == "tensorrt":
        if settings.backend not in ("auto", "tensorrt") or device == "cpu":
            raise UserError(f"{model} is a TensorRT engine: it runs with backend tensorrt on a CUDA GPU only")
        return plan(
            settings, model, "tensorrt", "cuda", _artifact_precision(model), reason="a TensorRT engine"
        )
    checkpoint = model if kind == "checkpoint" else None
    if checkpoint is None:
        _artifact_precision(model)  # not a RefineDet ONNX model: refused now, in one line
    elif settings.backend == "torch":
        return fallback(settings, None, checkpoint, device, probes, "backend torch asked for")
    if settings.backend == "torch":
        raise UserError(f"backend torch needs a checkpoint (.pth), got {model}")
    if checkpoint is not None and device == "cpu" and settings.backend == "auto":
        return cpu_engine(checkpoint, settings, builders)
    if settings.backend == "openvino":
        if device != "cpu":
            raise UserError("backend openvino runs on a CPU here: use --device cpu")
        onnx = model if checkpoint is None else cached_onnx(model, settings, builders)
        return plan(
            settings, onnx, "openvino", "cpu", _artifact_precision(onnx), onnx, "backend openvino asked for"
        )
    try:
        onnx = model if checkpoint is None else cached_onnx(model, settings, builders)
    except UserError as exc:  # the file itself is unusable (e.g. not a checkpoint): torch would fail too
        raise UserError(f"ONNX export of {model} failed: {exc}") from exc
    except Exception as exc:
        if settings.backend != "auto":
            raise UserError(f"ONNX export of {model} failed: {exc}") from exc
        why = f"ONNX export failed ({type(exc).__name__}: {exc})"
        log.warning("%s; falling back to torch with %s", why, model)
        return fallback(settings, None, checkpoint, device, probes, why)
    if settings.backend == "onnxruntime" or device == "cpu":
        return fallback(settings, onnx, checkpoint, device, probes, f"backend {settings.backend} on {device}")
    try:
        engine = ensure_engine(onnx, settings, probes, builders)
    except EngineUnavailable as exc:
        if settings.backend == "tensorrt":
            raise UserError(f"backend tensorrt but no engine: {exc}") from exc
        chosen = fallback(settings, onnx, checkpoint, device, probes, f"TensorRT unavailable: {exc}")
        log.warning("TensorRT unavailable: %s; falling back to %s on %s", exc, chosen.backend, chosen.device)
        return chosen
    return plan(
        settings, engine, "tensorrt", "cuda", settings.precision, onnx, "TensorRT engine for this GPU"
    )


def plan_for_files(
    model: str | Path | None, device: str, batch_size: int, threads: int | None = None
) -> EnginePlan:
    """The plan for the batch paths (``refinedet predict``, a Ray Data actor): the same decision as ``serve``
    for ``model`` (None: the shipped one) on ``device`` (auto | cpu | cuda), batches of ``batch_size``; the
    rest (REFINEDET_BACKEND, REFINEDET_CACHE_DIR, ...) from the environment, as for ``serve``."""
    check_batch_device(device)
    settings = Settings(
        model=Path(model) if model else None, device=device,  # type: ignore[arg-type]
        max_batch_size=batch_size, cpu_threads=threads, workers=1,
    )  # fmt: skip
    return prepare(settings)
