"""The CPU engine: the fastest artifact of a checkpoint that computes what the checkpoint computes,
made once into a cache and reused.

``prepare_cpu_artifact(checkpoint, cache_dir)`` returns ``CpuArtifact(artifact, engine, reason, record)``
with ``engine`` one of ``ENGINES`` (fastest first, on CPUs with VNNI):

1. ``onnxruntime-int8``: the FP32 export quantized from the checkpoint's stored activation ranges
   (``conversion.calibration_table``: no images needed), where that table exists;
2. ``onnxruntime-fp32``: the FP32 ONNX export;
3. ``torch-fp32``: the checkpoint itself, served by PyTorch.

Each candidate is checked against the checkpoint with the ``verify`` harness (raw outputs and
detections, the artifact's precision's tolerances) on deterministic synthetic smears
(``conversion.check_images``: a container has no data set), then the verified ones are timed (batch
1, interleaved, median) on this CPU with the threads a worker will have, and the fastest is chosen:
INT8 only where this CPU actually gains from it. A candidate that cannot be made, fails its check or
is slower is passed over with the reason logged and recorded. The decision is cached per checkpoint
hash, CPU (model name + instruction-set flags: ``model.cpu``), ONNX Runtime version and
ranges table, so a later start (or another replica sharing the cache) only reads a JSON file::

    <cache_dir>/cpu/<checkpoint sha256[:16]>/fp32.onnx (+ .json)
    <cache_dir>/cpu/<checkpoint sha256[:16]>/int8-<ranges sha256[:12]>-ort<version>.onnx (+ .json)
    <cache_dir>/cpu/<checkpoint sha256[:16]>/decision-<cpu key>-<digest>.json

Artifacts are built with ``conversion.engine_cache.build_once`` (flock, atomic publish, once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from conversion.engine_cache import build_once, exclusive_lock
from model.artifacts import atomic_write_bytes
from model.errors import UserError

log = logging.getLogger("refinedet.cpu_engine")

ENGINES = ("onnxruntime-int8", "onnxruntime-fp32", "torch-fp32")
ENGINE_CHOICES = ("auto", "int8", "fp32", "torch")
DECISION_VERSION = 1
CHECK_IMAGES = 8  # synthetic smears the candidates are verified on
TIMING_RUNS = 5  # timed batch-1 runs per candidate (after one warm-up), interleaved
INT8_MIN_GAIN = 1.1  # INT8 must be this much faster than FP32 ONNX Runtime to be chosen


class CpuArtifact(NamedTuple):
    """What to serve on this CPU: ``artifact`` (an .onnx with its manifest, or the checkpoint),
    ``engine`` (one of ``ENGINES``), ``reason`` (one line: why this one and not a faster one) and
    ``record`` (the decision as cached: CPU, candidates, checks, timings)."""

    artifact: Path
    engine: str
    reason: str
    record: dict[str, Any]

    @property
    def backend(self) -> str:
        """The service's ``--backend`` for it."""
        return "torch" if self.engine == "torch-fp32" else "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "engine": self.engine, "backend": self.backend,
                "reason": self.reason, "record": self.record}  # fmt: skip


def prepare_cpu_artifact(
    checkpoint: Path,
    cache_dir: Path,
    engine: str = "auto",
    threads: int | None = None,
    check_images: Sequence[Tensor] | None = None,
    lock_timeout_s: float = 1800.0,
) -> CpuArtifact:
    """The CPU artifact to serve for ``checkpoint`` (see the module doc); built into ``cache_dir`` once.

    ``engine``: ``auto`` (fastest verified), or ``int8`` / ``fp32`` / ``torch`` to ask for one (a
    requested ONNX engine that cannot be made or verified still falls back, with the reason).
    ``threads``: intra-op threads a serving worker will use (default: this process's usable cores).
    ``check_images``: uint8 RGB Tensor[3, H, W] to verify on (default: the synthetic smears)."""
    from model.checkpoint import file_sha256
    from model.cpu import cpu_info

    if engine not in ENGINE_CHOICES:
        raise UserError(f"CPU engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    cpu = cpu_info()
    threads = threads or cpu.usable_cores
    sha = file_sha256(checkpoint)
    folder = Path(cache_dir) / "cpu" / sha[:16]
    table = _ranges_table(checkpoint)
    key = _decision_key(sha, cpu.key(), table, engine, threads, check_images is None)
    decision = folder / f"decision-{_short(cpu.key())}-{key[:16]}.json"
    cached = _read_decision(decision)
    if cached is not None:
        log.info("CPU engine (cached decision %s): %s %s; %s", decision.name, cached.engine,
                 cached.artifact, cached.reason)  # fmt: skip
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / "decision.lock", lock_timeout_s, "CPU engine decision"):
        cached = _read_decision(decision)  # another replica decided while we waited
        if cached is not None:
            return cached
        choice = _decide(checkpoint, folder, engine, threads, table, check_images, lock_timeout_s)
        record = {**choice.record, "cpu": cpu.to_dict(), "threads": threads, "checkpoint_sha256": sha,
                  "requested": engine, "decision_version": DECISION_VERSION}  # fmt: skip
        choice = choice._replace(record=record)
        atomic_write_bytes(decision, (json.dumps(choice.to_dict(), indent=1) + "\n").encode())
    log.info("CPU engine: %s %s; %s", choice.engine, choice.artifact, choice.reason)
    return choice


def _short(text: str, limit: int = 60) -> str:
    return text[:limit]


def _ranges_table(checkpoint: Path) -> Path | None:
    from conversion.calibration_table import table_path_for

    path = table_path_for(checkpoint)
    return path if path.is_file() else None


def _decision_key(
    sha: str, cpu_key: str, table: Path | None, engine: str, threads: int, synthetic: bool
) -> str:
    from model.checkpoint import file_sha256

    fields = {"v": DECISION_VERSION, "checkpoint": sha, "cpu": cpu_key, "ort": _ort_version(),
              "table": file_sha256(table) if table else None, "engine": engine, "threads": threads,
              "check": "synthetic" if synthetic else "given", "torch": torch.__version__}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _read_decision(path: Path) -> CpuArtifact | None:
    """A cached decision whose artifact still exists (and matches its manifest), else None."""
    try:
        data = json.loads(path.read_text())
        artifact = Path(data["artifact"])
        if not artifact.is_file():
            return None
        if artifact.suffix == ".onnx":
            from model.artifacts import read_manifest

            read_manifest(artifact)  # checks the file's sha256 against its manifest
        return CpuArtifact(artifact, data["engine"], data["reason"], data["record"])
    except (OSError, ValueError, KeyError, UserError):
        return None


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


class _Candidate(NamedTuple):
    engine: str
    artifact: Path
    run: Callable[[Tensor], Any]  # images [1, 3, S, S] -> outputs


def _decide(checkpoint: Path, folder: Path, engine: str, threads: int, table: Path | None,
            check_images: Sequence[Tensor] | None, lock_timeout_s: float) -> CpuArtifact:  # fmt: skip
    from model.checkpoint import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(checkpoint, map_location="cpu")
    model = model.eval().requires_grad_(False)
    skipped: dict[str, str] = {}
    checks: dict[str, Any] = {}
    candidates: list[_Candidate] = []
    wanted = {"auto": ENGINES, "int8": ENGINES, "fp32": ENGINES[1:], "torch": ENGINES[2:]}[engine]
    images = list(check_images) if check_images is not None else None
    fp32: Path | None = None
    for name in wanted[:2]:
        try:
            fp32 = fp32 or _fp32_onnx(checkpoint, folder, lock_timeout_s)
            path = fp32 if name == "onnxruntime-fp32" else _int8_onnx(fp32, folder, table, lock_timeout_s)
            runner, report = _verify(model, path, threads, images)
        except Exception as exc:  # any failure only costs this candidate
            skipped[name] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
            log.warning("CPU engine %s unavailable: %s", name, skipped[name])
            continue
        checks[name] = report.to_dict()
        if not report.passed:
            skipped[name] = f"failed its check against the checkpoint: {'; '.join(report.failures())}"
            log.warning("CPU engine %s: %s", name, skipped[name])
            continue
        candidates.append(_Candidate(name, path, runner))
    candidates.append(_Candidate("torch-fp32", checkpoint, model))
    if engine != "auto":  # the requested engine when it passed, else the next one
        candidates = candidates[:1]
        timings: dict[str, float] = {}
    else:
        timings = _time(candidates, model.config.input_size)
        candidates = _rank(candidates, timings, skipped)
    chosen = candidates[0]
    reason = _reason(chosen.engine, timings, skipped, engine)
    record = {"timings_ms": timings, "skipped": skipped, "checks": checks}
    return CpuArtifact(chosen.artifact, chosen.engine, reason, record)


def _fp32_onnx(checkpoint: Path, folder: Path, lock_timeout_s: float) -> Path:
    from conversion.onnx_export import export_checkpoint

    def build(out: Path) -> None:
        log.info("exporting %s to FP32 ONNX (once per checkpoint)", checkpoint)
        export_checkpoint(checkpoint, out)

    return build_once(folder / "fp32.onnx", build, lock_timeout_s, "FP32 ONNX model")


def _int8_onnx(fp32: Path, folder: Path, table: Path | None, lock_timeout_s: float) -> Path:
    from conversion.calibration_table import quantize_with_table
    from model.checkpoint import file_sha256

    if table is None:
        raise UserError(
            "no INT8 ranges table beside the checkpoint (`refinedet export int8-ranges` makes one)"
        )

    def build(out: Path) -> None:
        log.info("quantizing %s to INT8 from %s (once per checkpoint and ranges)", fp32, table.name)
        quantize_with_table(fp32, out, table)

    name = f"int8-{file_sha256(table)[:12]}-ort{_ort_version()}.onnx"
    return build_once(folder / name, build, lock_timeout_s, "INT8 ONNX model")


def _verify(model: Any, path: Path, threads: int, images: list[Tensor] | None) -> tuple[Any, Any]:
    """(runner, ``VerifyReport``) of the ONNX model at ``path`` against ``model`` on the check images."""
    from conversion.check_images import synthetic_smears
    from conversion.verify import verify_artifact
    from model.preprocess import preprocess
    from model.runtime.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, intra_op_threads=threads)
    cfg = runner.config
    pictures = images if images is not None else synthetic_smears(CHECK_IMAGES)
    batches = [
        preprocess(pictures[i : i + 4], cfg.input_size, cfg.normalization) for i in range(0, len(pictures), 4)
    ]
    report = verify_artifact(model, runner, batches, str(path))
    log.info("checked %s against the checkpoint on %d images: %s", path.name, report.images,
             "PASS" if report.passed else "FAIL")  # fmt: skip
    return runner, report


def _time(candidates: list[_Candidate], size: int) -> dict[str, float]:
    """Median ms per batch-1 run of each candidate, the runs interleaved (so that load from other
    processes falls on all of them alike), after one warm-up each."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 50
    runs: dict[str, list[float]] = {c.engine: [] for c in candidates}
    with torch.inference_mode():
        for c in candidates:
            c.run(x)
        for _ in range(TIMING_RUNS):
            for c in candidates:
                start = time.perf_counter()
                c.run(x)
                runs[c.engine].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(ms), 1) for name, ms in runs.items()}


def _rank(
    candidates: list[_Candidate], timings: dict[str, float], skipped: dict[str, str]
) -> list[_Candidate]:
    """Fastest first; INT8 only when it beats FP32 ONNX Runtime by ``INT8_MIN_GAIN`` (else skipped)."""
    by_name = {c.engine: c for c in candidates}
    int8, fp32 = timings.get("onnxruntime-int8"), timings.get("onnxruntime-fp32")
    if int8 is not None and fp32 is not None and int8 * INT8_MIN_GAIN > fp32:
        skipped["onnxruntime-int8"] = f"not faster on this CPU ({int8} ms vs FP32 ONNX Runtime {fp32} ms)"
        del by_name["onnxruntime-int8"]
    return sorted(by_name.values(), key=lambda c: timings[c.engine])


def _reason(engine: str, timings: dict[str, float], skipped: dict[str, str], requested: str) -> str:
    if requested != "auto":
        why = f"requested {requested}"
    elif timings:
        why = "fastest verified on this CPU (" + ", ".join(f"{k} {v} ms" for k, v in timings.items()) + ")"
    else:
        why = "the only engine left"
    passed = [f"{k}: {v}" for k, v in skipped.items() if ENGINES.index(k) < ENGINES.index(engine)]
    return why + ("; passed over " + "; ".join(passed) if passed else "")
