"""The ``refinedet`` dispatcher: --version, and argument errors reported before anything heavy loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from refinedet.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(r"refinedet (\d+\.\d+\.\d+\S*|unknown)\n", capsys.readouterr().out)


def test_info_reports_an_unknown_preset_before_importing_torch():
    code = (
        "import sys; from refinedet.cli import main; rc = main(['info', 'refinedet300']); "
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"]
    assert "unknown preset 'refinedet300'" in done.stderr and "refinedet320_vgg16" in done.stderr


def test_info_json(capsys):
    assert main(["info", "refinedet320_vgg16", "--num-classes", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_anchors"] == 6375 and info["num_classes"] == 4  # the paper's count; 3 + background


def test_info_without_a_preset_lists_them_without_importing_torch():
    code = (
        "import sys; from refinedet.cli import main; rc = main(['info']); "
        "print(rc, 'torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stderr.split() == ["0", "False"]
    from model.config import PRESETS

    rows = [line.split()[0] for line in done.stdout.splitlines()[1:-1]]
    assert rows == list(PRESETS)
    assert "refinedet320_vgg16" in done.stdout and "(the shipped BCCD model's)" in done.stdout


def test_info_says_which_classes_it_assumed(capsys, monkeypatch, tmp_path):
    import model.zoo

    assert main(["info", "refinedet320_vgg16", "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert (
        shipped["classes"] == "3, the shipped model's (Platelets, RBC, WBC)" and shipped["num_classes"] == 4
    )
    assert main(["info", "refinedet512_vgg16", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["classes"].startswith("20, the preset's (PASCAL VOC)") and other["num_classes"] == 21
    monkeypatch.setattr(model.zoo, "DEFAULT_CHECKPOINT", tmp_path / "absent.pth.xz")  # an install without it
    assert main(["info", "refinedet320_vgg16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 21
