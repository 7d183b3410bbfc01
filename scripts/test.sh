#!/usr/bin/env bash
# The whole test suite: lint, types, tests. Called by `make test` (which builds .venv first).
# Services the tests need: deploy/local/services.sh (PostgreSQL + broker), stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy"
"$BIN/mypy"
echo "== system packages"
bash scripts/system-deps.sh
echo "== services"
# A throwaway PostgreSQL and a Tansu broker on loopback for the integration tests; stopped on
# exit, whatever happens. (Tests that stop and restart a broker start their own.)
export SM_SERVICES_DIR="${SM_SERVICES_DIR:-$(mktemp -d -t sm-services-XXXXXX)}"
trap 'deploy/local/services.sh down >/dev/null' EXIT
eval "$(PYTHON="$BIN/python" deploy/local/services.sh up)"
# The tests read DATABASE_URL; they configure the service explicitly, so the service's own
# variables must not leak into them.
unset SAFETY_MONITOR_DATABASE_URL SAFETY_MONITOR_KAFKA_BOOTSTRAP
echo "== pytest"
"$BIN/pytest" "$@"
