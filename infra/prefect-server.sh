#!/usr/bin/env bash
# Start a real Prefect server on 127.0.0.1 (needed for scheduled deployments: the temporary local API
# never creates scheduled runs), wait until it is healthy, and print the PREFECT_API_URL to export.
# Usage: infra/prefect-server.sh [port]      Stop: kill "$(cat .prefect/server.pid)"   (SIGTERM)
set -euo pipefail
cd "$(dirname "$0")/.."
port=${1:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p "$PREFECT_HOME"
.venv/bin/prefect server start --host 127.0.0.1 --port "$port" >"$PREFECT_HOME/server.log" 2>&1 &
echo $! >"$PREFECT_HOME/server.pid"
for _ in $(seq 1 60); do
  if curl -fsS "http://127.0.0.1:$port/api/health" >/dev/null 2>&1; then
    echo "export PREFECT_API_URL=http://127.0.0.1:$port/api"
    exit 0
  fi
  sleep 1
done
echo "prefect server did not become healthy in 60 s; see $PREFECT_HOME/server.log" >&2
exit 1
