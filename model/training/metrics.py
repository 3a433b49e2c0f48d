"""Training metrics: CSV files in the run folder, mirrored to TensorBoard when it is installed.

``metrics.csv`` gets one row per logging interval (iteration, epoch, lr, the loss terms averaged over
the interval, images/s); ``eval.csv`` one row per evaluation. On resume, rows written after the
checkpoint's iteration (by the interrupted run) are dropped so the files read as one run.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRAIN_FIELDS = (
    "iteration",
    "epoch",
    "lr",
    "loss",
    "arm_loc",
    "arm_conf",
    "odm_loc",
    "odm_conf",
    "images_per_s",
    "time_s",
)
EVAL_FIELDS = ("iteration", "mAP", "best_mAP")


class CsvLog:
    """Append-only CSV with a fixed header; ``truncate_after(it)`` drops rows past iteration ``it``."""

    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        self.path, self.fields = path, fields

    def truncate_after(self, iteration: int) -> None:
        if not self.path.is_file():
            return
        with self.path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(float(r.get("iteration") or 0)) <= iteration]
        self._write(rows, "w")

    def append(self, row: Mapping[str, Any]) -> None:
        self._write([row], "a")

    def _write(self, rows: Sequence[Mapping[str, Any]], mode: str) -> None:
        header = mode == "w" or not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if header:
                writer.writeheader()
            writer.writerows(rows)


class MetricsLogger:
    """Rank 0's metrics sink: CSV always, TensorBoard (``output/tensorboard``) if the package exists."""

    def __init__(self, output: Path, resume_iteration: int | None = None) -> None:
        self.train = CsvLog(output / "metrics.csv", TRAIN_FIELDS)
        self.eval = CsvLog(output / "eval.csv", EVAL_FIELDS)
        if resume_iteration is not None:
            self.train.truncate_after(resume_iteration)
            self.eval.truncate_after(resume_iteration)
        self.tensorboard = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output / "tensorboard"), purge_step=resume_iteration)

    def log_train(self, row: Mapping[str, Any]) -> None:
        self.train.append(row)
        self._scalars("train", row)

    def log_eval(self, row: Mapping[str, Any]) -> None:
        self.eval.append(row)
        self._scalars("val", row)

    def _scalars(self, prefix: str, row: Mapping[str, Any]) -> None:
        if self.tensorboard is None:
            return
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, row["iteration"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
