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
