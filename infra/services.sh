#!/usr/bin/env bash
# The team services on this machine, on 127.0.0.1: PostgreSQL (Debian's binaries, a cluster of its own),
# an MLflow server (PostgreSQL backend store, artifacts proxied through the server into a local folder) and
# a Prefect server (PostgreSQL database; a real server is what runs schedules).
#
#   infra/services.sh start   start what is not running, wait until healthy, print the exports to eval
#   infra/services.sh stop    stop the servers by PID (SIGTERM to each one's process group), then PostgreSQL
#
# Settings (environment): TOKENBRIDGE_SERVICES_DIR (state, logs, PID files; default .services),
# TOKENBRIDGE_POSTGRES_PORT (5433: Debian's own cluster takes 5432), TOKENBRIDGE_MLFLOW_PORT (5000),
# TOKENBRIDGE_PREFECT_PORT (4200), TOKENBRIDGE_MLFLOW_WORKERS (2), PG_BIN (PostgreSQL's bin folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$(realpath -m "${TOKENBRIDGE_SERVICES_DIR:-.services}")
PG_PORT=${TOKENBRIDGE_POSTGRES_PORT:-5433}
MLFLOW_PORT=${TOKENBRIDGE_MLFLOW_PORT:-5000}
PREFECT_PORT=${TOKENBRIDGE_PREFECT_PORT:-4200}
VENV_BIN=$ROOT/.venv/bin
PGDATA=$DIR/postgres
PG_USER=tokenbridge

say() { echo "services: $*" >&2; }
fail() { say "$*"; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# PostgreSQL refuses to run as root: as root, its commands run as the `postgres` system user.
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

find_pg_bin() {
  if [[ -n ${PG_BIN:-} ]]; then
    [[ -x $PG_BIN/pg_ctl ]] || fail "PG_BIN=$PG_BIN has no pg_ctl; point it at PostgreSQL's bin folder"
    return
  fi
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -z $PG_BIN ]] && [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing PostgreSQL (apt-get install -y postgresql)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [[ -n $PG_BIN ]] || fail "PostgreSQL server binaries not found: install them (Debian: apt-get install postgresql) or set PG_BIN"
}

start_postgres() {
  mkdir -p "$DIR"
  if [[ ! -f $DIR/postgres.password ]]; then
    (umask 077; "$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(16))' >"$DIR/postgres.password")
  fi
  PG_PASSWORD=$(cat "$DIR/postgres.password")
  if [[ ! -f $PGDATA/PG_VERSION ]]; then
    mkdir -p "$PGDATA"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$PGDATA"; fi
    chmod 700 "$PGDATA"
    as_pg test -w "$PGDATA" \
      || fail "the postgres user cannot reach $PGDATA: set TOKENBRIDGE_SERVICES_DIR to a folder whose parents it can traverse"
    local pwfile=$DIR/.pwfile
    (umask 077; cp "$DIR/postgres.password" "$pwfile")
    if [[ $EUID -eq 0 ]]; then chown postgres: "$pwfile"; fi
    say "initialising a PostgreSQL cluster in $PGDATA"
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
      --locale=C >"$DIR/initdb.log" 2>&1 || { rm -f "$pwfile"; fail "initdb failed; see $DIR/initdb.log"; }
    rm -f "$pwfile"
  fi
  if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    say "PostgreSQL already running"
  else
    port_busy "$PG_PORT" && fail "port $PG_PORT on 127.0.0.1 is taken: set TOKENBRIDGE_POSTGRES_PORT to a free port"
    # TCP only: a Unix socket's path would be limited to 107 bytes and need a folder writable by postgres.
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=''" start >&2 \
      || fail "PostgreSQL did not start; see $PGDATA/server.log"
  fi
  local db
  for db in mlflow prefect; do
    if [[ -z $(PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
      PGPASSWORD=$PG_PASSWORD "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$db"
    fi
  done
}

# Each server starts in a session of its own (setsid), so its PID is also its process group: stop ends
# the server and the workers it spawned together.
start_mlflow() {
  if alive "$DIR/mlflow.pid"; then say "MLflow server already running"; return; fi
  port_busy "$MLFLOW_PORT" && fail "port $MLFLOW_PORT on 127.0.0.1 is taken: set TOKENBRIDGE_MLFLOW_PORT to a free port"
  mkdir -p "$DIR/mlartifacts"
  # The store URI holds the password: passed in the environment, never on a command line. The job runner
  # (GenAI evaluation jobs, about 2 GB of worker processes) is not used by the pipeline.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_BACKEND_STORE_URI="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
    setsid "$VENV_BIN/mlflow" server --artifacts-destination "$DIR/mlartifacts" --host 127.0.0.1 \
    --port "$MLFLOW_PORT" --workers "${TOKENBRIDGE_MLFLOW_WORKERS:-2}" >"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
}

start_prefect() {
  if alive "$DIR/prefect.pid"; then say "Prefect server already running"; return; fi
  port_busy "$PREFECT_PORT" && fail "port $PREFECT_PORT on 127.0.0.1 is taken: set TOKENBRIDGE_PREFECT_PORT to a free port"
  mkdir -p "$DIR/prefect"
  PREFECT_HOME=$DIR/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/prefect" \
    setsid "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
    >"$DIR/prefect.log" 2>&1 </dev/null &
  echo $! >"$DIR/prefect.pid"
}

wait_healthy() {  # name url pidfile log
  local _
  for _ in $(seq 1 "${TOKENBRIDGE_SERVICES_TIMEOUT:-180}"); do
    curl -fsS "$2" >/dev/null 2>&1 && return 0
    alive "$3" || { tail -n 30 "$4" >&2; stop; fail "$1 exited during start; see $4"; }
    sleep 1
  done
  tail -n 30 "$4" >&2
  stop
  fail "$1 did not become healthy at $2; see $4"
}

stop_server() {  # name pidfile
  alive "$2" || { rm -f "$2"; return 0; }
  local pid _
  pid=$(cat "$2")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 30); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    say "$1 ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$2"
  say "stopped $1 (PID $pid)"
}

stop() {
  stop_server "Prefect server" "$DIR/prefect.pid"
  stop_server "MLflow server" "$DIR/mlflow.pid"
  if [[ -f $PGDATA/postmaster.pid ]]; then
    find_pg_bin
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >&2 || true
  fi
}

start() {
  [[ -x $VENV_BIN/mlflow ]] || fail "$VENV_BIN has no mlflow: run 'make install' first"
  find_pg_bin
  start_postgres
  start_mlflow
  start_prefect
  wait_healthy "MLflow server" "http://127.0.0.1:$MLFLOW_PORT/health" "$DIR/mlflow.pid" "$DIR/mlflow.log"
  wait_healthy "Prefect server" "http://127.0.0.1:$PREFECT_PORT/api/health" "$DIR/prefect.pid" "$DIR/prefect.log"
  cat >"$DIR/env" <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
EOF
  say "MLflow UI http://127.0.0.1:$MLFLOW_PORT, Prefect UI http://127.0.0.1:$PREFECT_PORT; logs in $DIR"
  cat "$DIR/env"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) fail "usage: infra/services.sh start|stop" ;;
esac
