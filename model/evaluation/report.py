"""Evaluation outputs: the per-class table for the terminal, the JSON results file (written
atomically) and one precision-recall PNG per class (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from model.checkpoint import atomic_write


def _fmt(value: float) -> str:
    return "     n/a" if value is None or math.isnan(value) else f"{100 * value:8.2f}"


def format_table(result: Mapping[str, Any]) -> str:
    """Per-class AP (in %) with ground-truth / detection counts when known, the mean, COCO's AP50..APl."""
    positives = result.get("num_positives")
    detections = result.get("num_detections", {})
    label = "mAP@[.5:.95]" if result.get("metric") == "coco" else f"mAP ({result.get('metric', 'voc')})"
    width = max([len("class"), len(label), *(len(n) for n in result["per_class"])])
    lines = [f"{'class':<{width}}  {'AP (%)':>8}" + (f"  {'gts':>6}  {'dets':>7}" if positives else "")]
    for name, ap in result["per_class"].items():
        counts = f"  {positives.get(name, ''):>6}  {detections.get(name, ''):>7}" if positives else ""
        lines.append(f"{name:<{width}}  {_fmt(ap)}{counts}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{label:<{width}}  {_fmt(result['mAP'])}")
    if result.get("metric") == "coco":
        lines.append(
            "  ".join(f"{k} {_fmt(result[k]).strip()}" for k in ("AP50", "AP75", "APs", "APm", "APl"))
        )
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """Plain JSON values: numpy/tensor scalars and arrays to Python, NaN to None; drops ``pr_curves``."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items() if k != "pr_curves"}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays/scalars, tensors
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``json_ready(data)`` atomically (indent 2, strict JSON: no NaN)."""
    text = json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n"

    def write(f: BinaryIO) -> None:
        f.write(text.encode())

    return atomic_write(path, write)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def _save_png(fig: Any, f: BinaryIO) -> None:
    fig.savefig(f, format="png")


def plot_pr_curves(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """One ``pr_<class>.png`` per class with a curve in ``result["pr_curves"]``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = []
    for name, curve in result.get("pr_curves", {}).items():
        recall, precision = np.asarray(curve["recall"], float), np.asarray(curve["precision"], float)
        fig = Figure(figsize=(5, 4), dpi=100)
        ax = fig.add_subplot()
        ax.plot(recall, precision, drawstyle="steps-post", linewidth=1.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{name}: AP {_fmt(result['per_class'].get(name, math.nan)).strip()}%")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"pr_{_safe(name)}.png"
        atomic_write(path, partial(_save_png, fig))
        paths.append(path)
    return paths
