"""Plot training curves (loss terms and images/s) from one or more runs' metrics.csv into a PNG.

Usage: python scripts/plot_training.py RUN_DIR [RUN_DIR ...] -o curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_metrics(run: Path) -> dict[str, list[float]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]} if rows else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ["loss", "arm_loc", "arm_conf", "odm_loc", "odm_conf"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for run in args.runs:
        m = read_metrics(run)
        if not m:
            continue
        for ax, term in zip(axes.flat, [*terms, "lr"], strict=True):
            ax.plot(m["iteration"], m[term], label=run.name, lw=1)
            ax.set_title(term)
            ax.set_xlabel("iteration")
            if term != "lr":
                ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
