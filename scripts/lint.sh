#!/usr/bin/env bash
# The README's lint row: ruff (lint + format check), import-linter's layering contracts, mypy.
# Runs every check and fails if any failed, so one run shows all the problems.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
status=0
run() {
  echo "== $*"
  "$@" || status=1
}
run "$BIN/ruff" check .
run "$BIN/ruff" format --check .
run "$BIN/lint-imports"
run "$BIN/mypy"
[ "$status" -eq 0 ] && echo "lint: all checks passed" || echo "lint: FAILED" >&2
exit "$status"
