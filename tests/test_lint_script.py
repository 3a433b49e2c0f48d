"""scripts/lint.sh (the README's lint row, for CI): runs every check, fails when any fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("ruff", "lint-imports", "mypy")


def fake_venv(tmp_path: Path, failing: str | None) -> Path:
    """A venv whose tools only log their arguments; ``failing`` exits 1."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for tool in TOOLS:
        script = bin_dir / tool
        status = 1 if tool == failing else 0
        script.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> {log}\nexit {status}\n')
        script.chmod(0o755)
    return bin_dir.parent


@pytest.mark.parametrize("failing", [None, "ruff", "lint-imports", "mypy"])
def test_lint_script_runs_every_check_and_fails_if_any_fails(tmp_path, failing):
    venv = fake_venv(tmp_path, failing)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lint.sh")],
        env={"VENV": str(venv), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [line.strip() for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert calls == ["ruff check .", "ruff format --check .", "lint-imports", "mypy"]
    assert done.returncode == (0 if failing is None else 1), done.stdout + done.stderr
    assert ("lint: all checks passed" in done.stdout) is (failing is None)
