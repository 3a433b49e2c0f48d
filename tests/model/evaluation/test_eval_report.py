"""Terminal table, strict JSON (NaN -> null, written atomically) and precision-recall PNGs."""

from __future__ import annotations

import json
import math

import numpy as np

from model.evaluation.report import format_table, json_ready, plot_pr_curves, write_json

RESULT = {
    "metric": "voc07",
    "mAP": 0.625,
    "per_class": {"RBC": 0.75, "WBC": 0.5, "Platelets": math.nan},
    "num_positives": {"RBC": 10, "WBC": 2, "Platelets": 0},
    "num_detections": {"RBC": 12, "WBC": 3, "Platelets": 4},
    "pr_curves": {
        "RBC": {"recall": np.array([0.1, 0.5, 0.75]), "precision": np.array([1.0, 0.8, 0.6])},
        "WBC": {"recall": np.array([0.5, 0.5]), "precision": np.array([1.0, 0.5])},
    },
    "sizes": np.array([1, 2]),
}


def test_table_lists_every_class_and_the_mean():
    table = format_table(RESULT)
    lines = table.splitlines()
    assert any(line.startswith("RBC") and "75.00" in line and "10" in line for line in lines)
    assert any(line.startswith("Platelets") and "n/a" in line for line in lines)
    assert "mAP (voc07)" in lines[-1] and "62.50" in lines[-1]


def test_coco_table_shows_the_coco_metrics():
    coco = {
        "metric": "coco",
        "mAP": 0.3,
        "AP50": 0.5,
        "AP75": 0.25,
        "APs": math.nan,
        "APm": 0.1,
        "APl": 0.2,
        "per_class": {"x": 0.3},
    }
    table = format_table(coco)
    assert "mAP@[.5:.95]" in table and "AP50 50.00" in table and "APs n/a" in table


def test_json_is_strict_and_drops_curves(tmp_path):
    path = write_json(tmp_path / "out" / "results.json", RESULT)
    data = json.loads(path.read_text())  # would fail on NaN with a strict parser below
    json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data["per_class"]["Platelets"] is None and data["per_class"]["RBC"] == 0.75
    assert "pr_curves" not in data and data["sizes"] == [1, 2]
    assert not list(tmp_path.glob("out/.*.tmp"))  # the atomic write left no temporary file
    assert json_ready({"x": np.float32(0.5)}) == {"x": 0.5}


def test_one_png_per_class_with_a_curve(tmp_path):
    paths = plot_pr_curves(RESULT, tmp_path)
    assert sorted(p.name for p in paths) == ["pr_RBC.png", "pr_WBC.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
