#!/usr/bin/env bash
# The whole test suite: lint, types, tests. Called by `make test` (which builds .venv first).
# Services the tests need are started by the tests' fixtures and stopped when they end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy"
"$BIN/mypy"
echo "== pytest"
"$BIN/pytest" "$@"
