"""The CPU engine: the fastest artifact of a checkpoint that computes what the checkpoint computes,
made once into a cache and reused.

``prepare_cpu_artifact(checkpoint, cache_dir)`` returns ``CpuArtifact(artifact, engine, reason, record)``
with ``engine`` one of ``ENGINES``, two ONNX files on two runtimes and the checkpoint itself:

1. ``openvino-int8`` / ``onnxruntime-int8``: the FP32 export quantized (QDQ) from the checkpoint's stored
   activation ranges (``conversion.calibration_table``: no images needed), where that table exists, run
   by OpenVINO or by ONNX Runtime;
2. ``openvino-fp32`` / ``onnxruntime-fp32``: the FP32 ONNX export; OpenVINO chooses its own inference
   precision (BF16 on a CPU with BF16 instructions), checked with that precision's tolerances;
3. ``torch-fp32``: the checkpoint itself, served by PyTorch.

Each candidate is checked against the checkpoint with the ``verify`` harness (raw outputs and
detections, the precision's tolerances) on deterministic synthetic smears (``conversion.check_images``:
a container has no data set), then the verified ones are timed (batch 1, median) on this CPU with the
threads a worker will have, and the fastest is chosen: INT8 only where it beats the fastest non-INT8
candidate by ``INT8_MIN_GAIN``. ONNX Runtime and torch are checked in this process and timed interleaved;
each OpenVINO candidate is checked and timed in a child process with a deadline
(``conversion.cpu_candidate``): OpenVINO does not officially support every CPU, and a candidate that
cannot be made, crashes, hangs, fails its check or is slower is passed over with the reason logged and
recorded. The decision is cached per checkpoint hash, CPU (model name + instruction-set flags:
``model.cpu``), ONNX Runtime, OpenVINO and torch versions, ranges table and threads, so a later start (or
another replica sharing the cache) only reads a JSON file (``conversion.cpu_decision``: paths relative to
the cache, the served file's sha256)::

    <cache_dir>/cpu/<checkpoint sha256[:16]>/fp32-decoded.onnx (+ .json)
    <cache_dir>/cpu/<checkpoint sha256[:16]>/int8-decoded-<ranges sha256[:12]>-ort<version>.onnx (+ .json)
    <cache_dir>/cpu/<checkpoint sha256[:16]>/decision-<cpu key>-<digest>.json

Artifacts are built with ``conversion.engine_cache.build_once`` (flock, atomic publish, once, rebuilt when
they fail their manifest's sha256). The cache heals:

- a served artifact found damaged or missing at a start is rebuilt; the same bytes as verified are served
  again under the same decision, anything else is decided again;
- a candidate the cache could not hold (full disk, read-only or unwritable folder, a build lock held too
  long: ``engine_cache.describe_fault``) is not a candidate that lost: the choice made without it is
  served for now with the fault recorded and logged in one line, and the next start decides again;
- an unwritable cache is not fatal: a decision it holds is served, else torch, with the fault;
- whatever a killed build left (``.*.tmp``) is removed under the decision lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from conversion.cpu_candidate import ALIASES, ENGINES, CandidateError, Reference
from conversion.cpu_decision import (
    Cached,
    CpuArtifact,
    decision_stamp,
    read_decision,
    save_decision,
    serve_without_cache,
)
from conversion.engine_cache import Fault, build_once, describe_fault, exclusive_lock, remove_leftovers
from model.artifacts import read_manifest
from model.errors import UserError

log = logging.getLogger("refinedet.cpu_engine")

ENGINE_CHOICES = ("auto", *ENGINES, *ALIASES)
# 3: the ONNX candidates decode inside the graph; 4: relative paths, the artifact's sha256, faults recorded
# (a version-3 decision may have been made under a fault it did not record: decided again)
DECISION_VERSION = 4
INT8_MIN_GAIN = 1.1  # an INT8 engine must be this much faster than the fastest other one to be chosen
CHILD_TIMEOUT_S = 300.0  # an OpenVINO candidate's check and timing, in its child process


def prepare_cpu_artifact(
    checkpoint: Path,
    cache_dir: Path,
    engine: str = "auto",
    threads: int | None = None,
    check_images: Sequence[Tensor] | None = None,
    lock_timeout_s: float = 1800.0,
    child_timeout_s: float = CHILD_TIMEOUT_S,
) -> CpuArtifact:
    """The CPU artifact to serve for ``checkpoint`` (see the module doc); built into ``cache_dir`` once.

    ``engine``: ``auto`` (fastest verified), or one of ``ENGINES`` (or the aliases ``int8`` / ``fp32`` /
    ``torch`` for ONNX Runtime's and torch's) to ask for one: a requested engine that cannot be made or
    verified falls back, with the reason, to the same runtime's FP32 engine, then to torch.
    ``threads``: intra-op threads a serving worker will use (default: this process's usable cores).
    ``check_images``: uint8 RGB Tensor[3, H, W] to verify on (default: the synthetic smears).
    ``child_timeout_s``: how long an OpenVINO candidate's child process may take."""
    from model.checkpoint import file_sha256
    from model.cpu import cpu_info

    if engine not in ENGINE_CHOICES:
        raise UserError(f"CPU engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    engine = ALIASES.get(engine, engine)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    cpu = cpu_info()
    threads = threads or cpu.usable_cores
    sha = file_sha256(checkpoint)
    cache_dir = Path(cache_dir)
    folder = cache_dir / "cpu" / sha[:16]
    table = _ranges_table(checkpoint)
    key = _decision_key(sha, cpu.key(), table, engine, threads, check_images is None)
    decision = folder / f"decision-{_short(cpu.key())}-{key[:16]}.json"
    seen = decision_stamp(decision)
    cached = read_decision(decision, cache_dir, checkpoint)
    if cached is not None and cached.final:
        choice = cached.choice
        log.info("CPU engine (cached decision %s): %s %s; %s", decision.name, choice.engine, choice.artifact,
                 choice.reason)  # fmt: skip
        return choice
    artifacts = _Artifacts(checkpoint, folder, table, lock_timeout_s)
    with ExitStack() as locked:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            locked.enter_context(
                exclusive_lock(folder / "decision.lock", lock_timeout_s, "CPU engine decision")
            )
        except OSError as exc:  # a read-only or unwritable cache
            fault = describe_fault(exc, cache_dir)
            if fault is None:
                raise
            return serve_without_cache(checkpoint, cached, fault)
        remove_leftovers(folder)  # no other decision runs: whatever a killed one was writing is left over
        settled = _settled(decision, seen, cache_dir, checkpoint, artifacts)
        if settled is not None:
            return settled
        choice = _Decision(artifacts, cache_dir, threads, child_timeout_s).run(engine, check_images)
        record = {**choice.record, "cpu": cpu.to_dict(), "threads": threads, "checkpoint_sha256": sha,
                  "requested": engine, "decision_version": DECISION_VERSION}  # fmt: skip
        choice = choice._replace(record=record)
        save_decision(decision, choice, cache_dir)
    # The reason starts with the fault, if any; `refinedet serve` says it again as its one WARNING line.
    log.info("CPU engine: %s (%s) %s; %s", choice.engine, choice.precision, choice.artifact, choice.reason)
    return choice


def _settled(
    decision: Path, seen: tuple[int, int] | None, cache_dir: Path, checkpoint: Path, artifacts: _Artifacts
) -> CpuArtifact | None:
    """Under the decision lock: the cached decision to serve without deciding again (final, made by another
    process while this one waited, or repaired), or None."""
    cached = read_decision(decision, cache_dir, checkpoint)
    if cached is None:
        return None
    if cached.damage is None and (cached.final or decision_stamp(decision) != seen):
        return cached.choice  # final, or decided (or repaired) by another process while we waited
    if cached.choice.fault:
        log.info("CPU engine: retrying the decision made under a fault (%s)", cached.choice.fault)
        return None
    return _repair(cached, artifacts)


def _repair(cached: Cached, artifacts: _Artifacts) -> CpuArtifact | None:
    """The decision ``cached`` again once its damaged artifact is rebuilt into the same bytes as were
    verified (exporting and quantizing are deterministic); None when they differ or it cannot be rebuilt
    (then the caller decides again)."""
    choice = cached.choice
    log.info("CPU engine: repairing the decision for %s (%s)", choice.engine, cached.damage)
    try:
        path = artifacts.get(choice.engine.rsplit("-", 1)[1])
    except Exception as exc:  # the decision that follows meets the same failure, per candidate
        log.warning("CPU engine: rebuilding %s failed (%s): deciding again", choice.artifact.name, exc)
        return None
    sha = read_manifest(path, verify_hash=False).artifact_sha256  # build_once checked the file against it
    if path != choice.artifact or sha != choice.record.get("artifact_sha256"):
        log.warning("CPU engine: the rebuilt %s is not the file verified before: deciding again", path.name)
        return None
    log.info("CPU engine: %s rebuilt, the very file verified before (sha256 %s): serving %s again",
             path.name, sha[:12], choice.engine)  # fmt: skip
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
    from model.runtime.openvino import openvino_version

    fields = {"v": DECISION_VERSION, "checkpoint": sha, "cpu": cpu_key, "ort": _ort_version(),
              "openvino": openvino_version(), "table": file_sha256(table) if table else None,
              "engine": engine, "threads": threads, "check": "synthetic" if synthetic else "given",
              "torch": torch.__version__}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def wanted_engines(engine: str) -> list[str]:
    """The candidates for a request: every engine for ``auto``; else the requested one, then the same
    runtime's FP32 engine, then torch."""
    if engine == "auto":
        return list(ENGINES)
    runtime = engine.rsplit("-", 1)[0]
    fallbacks = [e for e in ENGINES[ENGINES.index(engine) + 1 :] if e.startswith(runtime + "-")]
    return list(dict.fromkeys([engine, *fallbacks, "torch-fp32"]))


class _Decision:
    """One decision: makes each wanted candidate's artifact, checks it (in this process, or in a child for
    OpenVINO), times the verified ones and ranks them."""

    def __init__(self, artifacts: _Artifacts, cache_dir: Path, threads: int, child_timeout_s: float) -> None:
        self.made, self.cache_dir, self.checkpoint = artifacts, cache_dir, artifacts.checkpoint
        self.threads, self.child_timeout_s = threads, child_timeout_s
        self.skipped: dict[str, str] = {}
        self.faults: dict[str, Fault] = {}  # candidates the cache could not hold: not passed over on merit
        self.checks: dict[str, Any] = {}
        self.precisions: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.runs: dict[str, Any] = {}  # verified in-process candidates: engine -> call
        self.artifacts: dict[str, Path] = {"torch-fp32": self.checkpoint}

    def run(self, engine: str, check_images: Sequence[Tensor] | None) -> CpuArtifact:
        from conversion.cpu_candidate import reference_outputs, save_reference
        from model.checkpoint import load_model

        torch.set_num_threads(self.threads)
        model, _ = load_model(self.checkpoint, map_location="cpu")
        model = model.eval().requires_grad_(False)
        reference = reference_outputs(model, check_images)
        wanted = wanted_engines(engine)
        self.runs["torch-fp32"], self.precisions["torch-fp32"] = model, "fp32"
        with tempfile.TemporaryDirectory(prefix="refinedet-cpu-engine-") as tmp:
            reference_file = save_reference(reference, Path(tmp) / "reference.pt")
            for name in wanted[:-1]:  # the last is torch-fp32: the checkpoint, always there
                self._candidate(name, reference, reference_file, Path(tmp))
            if engine == "auto":
                self._time(model, Path(tmp))
        verified = [n for n in wanted if n in self.precisions]
        ranked = _rank(verified, self.timings, self.skipped) if engine == "auto" else verified
        chosen = ranked[0]
        fault = _fault_line(self.faults, chosen)
        served = None if chosen == "torch-fp32" else read_manifest(self.artifacts[chosen], verify_hash=False)
        record = {"timings_ms": self.timings, "skipped": self.skipped, "checks": self.checks,
                  "precisions": self.precisions, "openvino": _openvino_version(), "fault": fault,
                  "artifact_sha256": served.artifact_sha256 if served else None}  # fmt: skip
        reason = _reason(chosen, self.timings, self.skipped, engine)
        return CpuArtifact(self.artifacts[chosen], chosen, f"{fault}; {reason}" if fault else reason, record)

    def _candidate(self, name: str, reference: Reference, reference_file: Path, tmp: Path) -> None:
        """Check ``name``; a verified one lands in ``precisions`` and ``artifacts`` (and ``runs`` when it
        ran in this process), any other in ``skipped`` with the reason."""
        from conversion.cpu_candidate import check, check_in_child

        runtime, precision = name.rsplit("-", 1)
        try:
            path = self.made.get(precision)
            if runtime == "openvino":
                answer = check_in_child(name, path, reference_file, self.threads, self.child_timeout_s, tmp)
                report, actual = answer["check"], answer["precision"]
                log.info("%s (%s, OpenVINO %s) checked in its child process: %s", name, actual,
                         answer["openvino"], "PASS" if report["passed"] else "FAIL")  # fmt: skip
            else:
                from model.runtime.onnxruntime import OnnxRuntimeRunner

                runner = OnnxRuntimeRunner(path, intra_op_threads=self.threads)
                report, actual = check(runner, reference, path.name).to_dict(), runner.precision
        except Exception as exc:  # any failure only costs this candidate
            fault = describe_fault(exc, self.cache_dir)
            if fault is not None:
                self.faults[name] = fault
            known = isinstance(exc, (UserError, CandidateError))
            why = fault.cause if fault else str(exc) if known else f"{type(exc).__name__}: {exc}"
            self.skipped[name] = why
            log.warning("CPU engine %s unavailable: %s", name, why)
            return
        self.checks[name] = report
        if not report["passed"]:
            failures = "; ".join(report["failures"])
            self.skipped[name] = f"failed its check against the checkpoint ({actual}): {failures}"
            log.warning("CPU engine %s: %s", name, self.skipped[name])
            return
        self.precisions[name], self.artifacts[name] = actual, path
        if runtime != "openvino":
            self.runs[name] = runner

    def _time(self, model: Any, tmp: Path) -> None:
        """Time the verified candidates interleaved: all of them in one child process when OpenVINO is
        among them (it runs OpenVINO), else here. A failed timing child costs the OpenVINO candidates only:
        the others are then timed here."""
        from conversion.cpu_candidate import time_in_child, time_runs

        openvino = [n for n in self.precisions if n.startswith("openvino-")]
        if openvino:
            checkpoint = self.checkpoint
            if checkpoint.suffix == ".xz":  # the child loads an uncompressed copy (seconds, not ten)
                from model.checkpoint import save_checkpoint

                checkpoint = save_checkpoint(tmp / "checkpoint.pth", model)
            candidates = {n: checkpoint if n == "torch-fp32" else self.artifacts[n] for n in self.precisions}
            try:
                self.timings.update(time_in_child(candidates, self.threads, self.child_timeout_s, tmp))
                return
            except CandidateError as exc:
                for name in openvino:
                    self.skipped[name] = f"timing process: {exc}"
                    del self.precisions[name]
                    log.warning("CPU engine %s: %s", name, self.skipped[name])
        self.timings.update(time_runs(self.runs, model.config.input_size))


def _fault_line(faults: dict[str, Fault], chosen: str) -> str:
    """One line when candidates were lost to the cache rather than on their merits: the cause, what is
    served meanwhile and the fix; empty otherwise."""
    if not faults:
        return ""
    first = next(iter(faults.values()))
    return (f"{first.cause}: {', '.join(faults)} could not be made, serving {chosen} until a start finds "
            f"the cache healthy (each start retries); fix: {first.fix}")  # fmt: skip


class _Artifacts:
    """The ONNX candidates' files in the cache folder, each built (or rebuilt when damaged) once."""

    def __init__(self, checkpoint: Path, folder: Path, table: Path | None, lock_timeout_s: float) -> None:
        self.checkpoint, self.folder, self.table = checkpoint, folder, table
        self.lock_timeout_s = lock_timeout_s
        self.made: dict[str, Path] = {}

    def get(self, precision: str) -> Path:
        """The FP32 (``fp32``) or INT8 (``int8``) ONNX model, checked against its manifest."""
        if precision not in self.made:
            fp32 = self.made.get("fp32") or _fp32_onnx(self.checkpoint, self.folder, self.lock_timeout_s)
            self.made["fp32"] = fp32
            if precision == "int8":
                self.made["int8"] = _int8_onnx(fp32, self.folder, self.table, self.lock_timeout_s)
        return self.made[precision]


def _openvino_version() -> str | None:
    from model.runtime.openvino import openvino_version

    return openvino_version()


def _fp32_onnx(checkpoint: Path, folder: Path, lock_timeout_s: float) -> Path:
    """The FP32 export with the box decoding (and ARM filtering) inside the graph (``outputs="decoded"``):
    only boxes and scores leave it, so the host's share of a request is the selection alone (post-processing
    7.7-8.6 -> 2.3 ms per image on the INT8 model, the same detections: docs/benchmarks.md)."""
    from conversion.onnx_export import export_checkpoint

    def build(out: Path) -> None:
        log.info("exporting %s to FP32 ONNX, decoding in the graph (once per checkpoint)", checkpoint)
        export_checkpoint(checkpoint, out, outputs="decoded")

    return build_once(folder / "fp32-decoded.onnx", build, lock_timeout_s, "FP32 ONNX model", read_manifest)


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

    name = f"int8-decoded-{file_sha256(table)[:12]}-ort{_ort_version()}.onnx"
    return build_once(folder / name, build, lock_timeout_s, "INT8 ONNX model", read_manifest)


def _rank(verified: list[str], timings: dict[str, float], skipped: dict[str, str]) -> list[str]:
    """The timed ``verified`` engines, fastest first; an INT8 one only when it beats the fastest non-INT8
    engine by ``INT8_MIN_GAIN`` (else skipped with the reason)."""
    timed = [n for n in verified if n in timings]
    others = [n for n in timed if not n.endswith("-int8")]
    best = min(others, key=lambda n: timings[n], default=None)
    kept = []
    for name in timed:
        if best is not None and name.endswith("-int8") and timings[name] * INT8_MIN_GAIN > timings[best]:
            skipped[name] = f"not faster on this CPU ({timings[name]} ms vs {best} {timings[best]} ms)"
            continue
        kept.append(name)
    return sorted(kept, key=lambda n: timings[n])


def _reason(engine: str, timings: dict[str, float], skipped: dict[str, str], requested: str) -> str:
    if requested != "auto":
        why = f"requested {requested}"
    elif timings:
        why = "fastest verified on this CPU (" + ", ".join(f"{k} {v} ms" for k, v in timings.items()) + ")"
    else:
        why = "the only engine left"
    passed = [f"{k}: {v}" for k, v in skipped.items() if k != engine]
    return why + ("; passed over " + "; ".join(passed) if passed else "")
