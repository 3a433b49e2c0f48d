"""Checking and timing one CPU engine candidate for ``conversion.cpu_engine``, in this process (ONNX
Runtime, torch) or in a child process with a deadline (OpenVINO).

- ``reference_outputs(model, images)``: the checkpoint's raw outputs on the check batches, computed once;
  every candidate is compared with them (``conversion.verify`` through ``RecordedModel``), so neither a
  candidate's check nor a child process runs or loads the checkpoint again.
- ``time_runs``: median ms per batch-1 call of several candidates, interleaved.
- ``check_in_child``: ``python -m conversion.cpu_candidate check`` checks one OpenVINO candidate in a
  child process and writes a JSON answer. OpenVINO does not officially support every CPU (AMD EPYC among
  them): a child that crashes (a segfault in a plugin), hangs past the deadline or fails costs only that
  candidate, returned as a ``CandidateError`` with the reason, never the decision.
- ``time_in_child``: ``python -m conversion.cpu_candidate time`` times every verified candidate (ONNX
  Runtime, OpenVINO and torch alike) interleaved in one child process, so that the engines are compared
  under the same load; if it fails, the caller times the in-process ones itself without OpenVINO.

``REFINEDET_CPU_ENGINE_FAULT="openvino-int8=crash,openvino-fp32=hang,timing=fail"`` makes the child
crash (SIGSEGV), hang or fail for those engines (``timing``: the timing child) before any work: how the
tests show that a bad candidate costs only itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# The CPU engines, in the order of preference (ties, requests' fallbacks); ``conversion.cpu_engine`` ranks
# them by speed. The aliases are the names ``refinedet export cpu --engine`` took before OpenVINO joined.
ENGINES = ("openvino-int8", "onnxruntime-int8", "openvino-fp32", "onnxruntime-fp32", "torch-fp32")
ALIASES = {"int8": "onnxruntime-int8", "fp32": "onnxruntime-fp32", "torch": "torch-fp32"}
CHECK_IMAGES = 8  # synthetic smears the candidates are verified on
TIMING_RUNS = 5  # timed batch-1 runs per candidate (after one warm-up), interleaved
FAULT_ENV = "REFINEDET_CPU_ENGINE_FAULT"
ROOT = Path(__file__).resolve().parents[1]  # the folder holding the conversion package


class CandidateError(Exception):
    """A candidate that could not be checked (its child crashed, hung or failed); the message says why."""


class Reference(NamedTuple):
    """The checkpoint on the check images: preprocessed ``batches`` [B, 3, S, S], its raw ``outputs``
    (four tensors per batch) and its ``anchors`` [A, 4] cxcywh."""

    batches: list[Any]
    outputs: list[tuple[Any, ...]]
    anchors: Any


def reference_outputs(model: Any, images: Sequence[Any] | None) -> Reference:
    """``model`` (a RefineDet) on ``images`` (uint8 RGB [3, H, W]; default: the synthetic smears), in
    batches of 4."""
    import torch

    from conversion.check_images import synthetic_smears
    from model.preprocess import preprocess

    cfg = model.config
    pictures = list(images) if images is not None else synthetic_smears(CHECK_IMAGES)
    batches = [
        preprocess(pictures[i : i + 4], cfg.input_size, cfg.normalization) for i in range(0, len(pictures), 4)
    ]
    with torch.inference_mode():
        outputs = [tuple(t.clone() for t in model(b)) for b in batches]
    return Reference(batches, outputs, model.anchors.clone())


def recorded_model(reference: Reference) -> Any:
    """A module standing in for the checkpoint's network in ``verify_artifact``: it answers the check
    batches with the recorded outputs (and refuses any other input)."""
    import torch
    from torch import nn

    from model.network import RefineDetOutput

    class RecordedModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("anchors", reference.anchors, persistent=False)

        def forward(self, images: torch.Tensor) -> RefineDetOutput:
            for batch, outputs in zip(reference.batches, reference.outputs, strict=True):
                if batch.shape == images.shape and torch.equal(batch, images.to(batch.device)):
                    return RefineDetOutput(*outputs)
            raise ValueError("the recorded reference has no outputs for these images")

    return RecordedModel()


def check(runner: Any, reference: Reference, label: str) -> Any:
    """The ``conversion.verify.VerifyReport`` of ``runner`` against the recorded checkpoint outputs, with
    the tolerances of the runner's precision."""
    import logging

    from conversion.verify import verify_artifact

    report = verify_artifact(recorded_model(reference), runner, reference.batches, label)
    logging.getLogger("refinedet.cpu_engine").info(
        "checked %s (%s) against the checkpoint on %d images: %s", label, runner.precision, report.images,
        "PASS" if report.passed else "FAIL: " + "; ".join(report.failures()),
    )  # fmt: skip
    return report


def time_runs(
    runs: dict[str, Callable[[Any], Any]], size: int, repeats: int = TIMING_RUNS
) -> dict[str, float]:
    """Median ms per batch-1 call of each of ``runs`` (name -> call on images [1, 3, S, S]), the calls
    interleaved (so that load from other processes falls on all of them alike), after one warm-up each."""
    import torch

    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 50
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(x)
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(ms), 1) for name, ms in samples.items() if ms}


def check_in_child(engine: str, artifact: Path, reference_file: Path, threads: int, timeout_s: float,
                   workdir: Path) -> dict[str, Any]:  # fmt: skip
    """Check the OpenVINO candidate ``engine`` on ``artifact`` against the recorded reference in a child
    process: its answer ({precision, inference_precision, openvino, check}), or a ``CandidateError``
    saying how the child failed."""
    args = ["check", "--engine", engine, "--artifact", str(artifact), "--reference", str(reference_file)]
    return _run_child(args, threads, timeout_s, workdir / f"{engine}.json")


def time_in_child(candidates: dict[str, Path], threads: int, timeout_s: float, workdir: Path,
                  runs: int = TIMING_RUNS) -> dict[str, float]:  # fmt: skip
    """``time_runs`` of the verified ``candidates`` (engine -> .onnx, or a checkpoint for torch-fp32) in
    one child process, interleaved; a ``CandidateError`` if it crashed, hung or failed."""
    args = ["time", "--runs", str(runs), *(f"--candidate={n}={p}" for n, p in candidates.items())]
    answer = _run_child(args, threads, timeout_s, workdir / "timing.json")
    return {name: float(ms) for name, ms in answer["timings_ms"].items()}


def _run_child(args: list[str], threads: int, timeout_s: float, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "conversion.cpu_candidate", *args, "--threads", str(threads),
               "--json-out", str(out)]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": path})  # fmt: skip
    except subprocess.TimeoutExpired:
        raise CandidateError(f"no answer within {timeout_s:g} s (hung); its process was killed") from None
    if done.returncode < 0:
        raise CandidateError(f"its process crashed ({signal.Signals(-done.returncode).name})")
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise CandidateError(f"its process failed (status {done.returncode}): {last}")
    answer: dict[str, Any] = json.loads(out.read_text())
    return answer


def _inject_fault(engine: str) -> None:
    """The fault ``FAULT_ENV`` asks for ``engine``, if any (tests only)."""
    faults = dict(item.split("=", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if "=" in item)
    fault = faults.get(engine)
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fault == "hang":
        while True:
            time.sleep(60)
    elif fault == "fail":
        raise SystemExit(f"{engine}: injected failure")


def _check_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.runtime.openvino import OpenVinoRunner

    saved = torch.load(args.reference, weights_only=True)
    reference = Reference(saved["batches"], [tuple(o) for o in saved["outputs"]], saved["anchors"])
    runner = OpenVinoRunner(args.artifact, threads=args.threads)
    report = check(runner, reference, args.engine)
    return {"precision": runner.precision, "inference_precision": runner.inference_precision,
            "openvino": runner.version, "check": report.to_dict()}  # fmt: skip


def _time_child(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Callable[[Any], Any]] = {}
    size = 0
    for item in args.candidate:
        name, _, path = item.partition("=")
        runs[name] = runner = make_runner(name, Path(path), args.threads)
        size = runner.config.input_size
    return {"timings_ms": time_runs(runs, size, args.runs)}


def make_runner(engine: str, path: Path, threads: int) -> Any:
    """The call that serves ``engine`` from ``path`` (an .onnx file, or the checkpoint for torch-fp32)."""
    runtime = engine.rsplit("-", 1)[0]
    if runtime == "torch":
        from model.checkpoint import load_model

        return load_model(path, map_location="cpu")[0].eval().requires_grad_(False)
    if runtime == "openvino":
        from model.runtime.openvino import OpenVinoRunner

        return OpenVinoRunner(path, threads=threads)
    from model.runtime.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, intra_op_threads=threads)


def save_reference(reference: Reference, path: Path) -> Path:
    import torch

    torch.save({"batches": reference.batches, "outputs": [list(o) for o in reference.outputs],
                "anchors": reference.anchors}, path)  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m conversion.cpu_candidate", description=__doc__.split("\n\n")[0]
    )
    modes = p.add_subparsers(dest="mode", required=True)
    c = modes.add_parser("check", help="check one OpenVINO candidate against the recorded reference")
    c.add_argument("--engine", required=True, help="openvino-int8 | openvino-fp32")
    c.add_argument("--artifact", required=True, type=Path, help="the .onnx file (with its manifest)")
    c.add_argument("--reference", required=True, type=Path, help="the checkpoint's outputs (save_reference)")
    t = modes.add_parser("time", help="time verified candidates, interleaved")
    t.add_argument("--candidate", action="append", required=True, help="ENGINE=PATH (repeat)")
    t.add_argument("--runs", type=int, default=TIMING_RUNS)
    for q in (c, t):
        q.add_argument("--threads", required=True, type=int, help="threads per inference")
        q.add_argument("--json-out", required=True, type=Path)
    args = p.parse_args(argv)
    _inject_fault(args.engine if args.mode == "check" else "timing")
    import logging

    import torch

    from model.artifacts import atomic_write_bytes

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    answer = _check_child(args) if args.mode == "check" else _time_child(args)
    atomic_write_bytes(args.json_out, json.dumps(answer).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
