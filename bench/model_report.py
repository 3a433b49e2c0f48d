"""The model benchmark's table and summary: ratios to the bare trunk, best-batch throughput, and
speedups on the same size/batch/mode: ONNX Runtime FP32 (the CPU target) and INT8 versus PyTorch
eager, and INT8 versus FP32 ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.common import format_table

TRUNK = "vgg16-trunk"
COLUMNS = (
    ("backend", "backend"),
    ("precision", "prec"),
    ("size", "size"),
    ("batch", "batch"),
    ("mode", "mode"),
    ("median_ms", "median ms"),
    ("p99_ms", "p99 ms"),
    ("images_per_s", "images/s"),
    ("vs_trunk", "x trunk"),
    ("gflop_s", "GFLOP/s"),
    ("of_gemm", "of GEMM"),
    ("iterations", "iters"),
    ("note", "note"),
)

Row = dict[str, Any]


def add_trunk_ratios(rows: Sequence[Row]) -> None:
    """Set ``vs_trunk`` = images/s over the trunk's at the same size, precision and batch."""
    trunk = {
        (r["size"], r["precision"], r["batch"]): r["images_per_s"]
        for r in rows
        if r["backend"] == TRUNK and r.get("images_per_s")
    }
    for r in rows:
        base = trunk.get((r["size"], r["precision"], r["batch"]))
        if r["backend"] != TRUNK and r.get("images_per_s") and base:
            r["vs_trunk"] = round(r["images_per_s"] / base, 3)


def table(rows: Sequence[Row]) -> str:
    shown = [{**r, "note": r.get("skipped") or r.get("note")} for r in rows]
    return format_table(shown, COLUMNS)


def _measured(rows: Sequence[Row], **match: Any) -> list[Row]:
    return [r for r in rows if r.get("images_per_s") and all(r.get(k) == v for k, v in match.items())]


def best_throughput(rows: Sequence[Row]) -> list[Row]:
    """Per (backend, precision, size, mode): the batch with the most images/s, and the trunk's best."""
    keys = sorted({(r["backend"], r["precision"], r["size"], r["mode"]) for r in _measured(rows)})
    out = []
    for backend, precision, size, mode in keys:
        best = max(_measured(rows, backend=backend, precision=precision, size=size, mode=mode),
                   key=lambda r: r["images_per_s"])  # fmt: skip
        trunk = _measured(rows, backend=TRUNK, precision=precision, size=size)
        trunk_best = max((r["images_per_s"] for r in trunk), default=None)
        out.append({
            "backend": backend, "precision": precision, "size": size, "mode": mode,
            "best_batch": best["batch"], "images_per_s": best["images_per_s"],
            "trunk_best_images_per_s": trunk_best,
            "vs_trunk_best": round(best["images_per_s"] / trunk_best, 3) if trunk_best else None,
        })  # fmt: skip
    return out


SPEEDUPS = (  # (backend, baseline)
    ("onnxruntime", "torch-eager"),
    ("onnxruntime-int8", "torch-eager"),
    ("onnxruntime-int8", "onnxruntime"),
)


def speedups(rows: Sequence[Row], backend: str, baseline: str) -> list[Row]:
    """How many times faster ``backend`` is than ``baseline`` (median latency) where both ran."""
    out = []
    for row in _measured(rows, backend=backend):
        match = _measured(rows, backend=baseline, size=row["size"], batch=row["batch"], mode=row["mode"])
        if match:
            speedup = match[0]["median_ms"] / row["median_ms"]
            out.append({"backend": backend, "baseline": baseline, "size": row["size"], "batch": row["batch"],
                        "mode": row["mode"], "baseline_median_ms": match[0]["median_ms"],
                        "median_ms": row["median_ms"], "speedup": round(speedup, 3)})  # fmt: skip
    return out


def ort_vs_eager(rows: Sequence[Row]) -> list[Row]:
    """ONNX Runtime FP32 versus PyTorch eager FP32: the CPU target's ratio."""
    return speedups(rows, "onnxruntime", "torch-eager")


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    return {
        "best_throughput": best_throughput(rows),
        "speedups": [s for backend, base in SPEEDUPS for s in speedups(rows, backend, base)],
    }


def summary_text(data: dict[str, Any]) -> str:
    lines = []
    best = [r for r in data["best_throughput"] if r["mode"] != "net" or r["backend"] == TRUNK]
    if best:
        lines.append("best-batch throughput (net+post; trunk: net):")
        lines.append(format_table(best, (
            ("backend", "backend"), ("precision", "prec"), ("size", "size"), ("best_batch", "batch"),
            ("images_per_s", "images/s"), ("trunk_best_images_per_s", "trunk images/s"),
            ("vs_trunk_best", "x trunk"),
        )))  # fmt: skip
    for r in data["speedups"]:
        lines.append(
            f"{r['backend']} vs {r['baseline']}, size {r['size']} batch {r['batch']} {r['mode']}: "
            f"{r['baseline_median_ms']:.2f} ms / {r['median_ms']:.2f} ms = {r['speedup']:.2f}x"
        )
    return "\n".join(lines)
