#!/usr/bin/env bash
# Start a local MLflow tracking + registry server on 127.0.0.1 from the project's .venv.
#
#   eval "$(infra/local/start_mlflow.sh)"      # stdout is only `export ...` lines; messages go to stderr
#
# Knobs:
#   MLFLOW_PORT (or PORT)           default 5000
#   MLFLOW_BACKEND_STORE_URI        default sqlite:///$PFSTORER_LOCAL_DIR/mlflow.db; start_postgres.sh
#                                   exports a postgresql+psycopg2:// one (as in infra/k8s)
#   MLFLOW_ARTIFACTS_DESTINATION    default $PFSTORER_LOCAL_DIR/mlflow-artifacts; an s3://bucket/prefix
#                                   uses the local S3 server when start_s3.sh runs (or any S3 given by
#                                   MLFLOW_S3_ENDPOINT_URL / AWS credentials)
#   MLFLOW_WORKERS                  default 1
#   MLFLOW_GUNICORN_OPTS            default "--worker-class gthread --threads 2": the server runs MLflow's
#                                   Flask app under gunicorn, about 5 ms of CPU less per request than
#                                   its default uvicorn front (benchmarks/bench_registry.py)
#   START_TIMEOUT_S                 how long to wait for /health, default 90 (the first start
#                                   creates the schema: a few seconds on an idle machine)
# plus those in common.sh. Stop with infra/local/stop.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${MLFLOW_PORT:-${PORT:-5000}}"
mkdir -p "$RUN_DIR"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$RUN_DIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$RUN_DIR/mlflow-artifacts}"
WORKERS="${MLFLOW_WORKERS:-1}"
service mlflow

need_venv mlflow mlflow-skinny
need_venv gunicorn gunicorn
GUNICORN_OPTS="${MLFLOW_GUNICORN_OPTS:---worker-class gthread --threads 2}"
# The server's job executor would spawn huey consumers (not installed, not used by pfstorer).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

running_already "MLflow" mlflow
port_free "$BIND_ADDRESS" "$PORT" || die "port $PORT on $BIND_ADDRESS is in use (set MLFLOW_PORT)"

case "$ARTIFACTS" in
    s3://*)
        # Artifacts on S3: reuse the local S3 server's endpoint and credentials unless given.
        if [ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ] && [ -f "$RUN_DIR/s3.env" ]; then
            . "$RUN_DIR/s3.env"
        fi
        ;;
    *://*) ;;
    *) mkdir -p "$ARTIFACTS" ;;
esac

URI="http://$BIND_ADDRESS:$PORT"
start_daemon "$PIDFILE" "$LOG" "$VENV/bin/mlflow" server \
    --host "$BIND_ADDRESS" --port "$PORT" --workers "$WORKERS" --gunicorn-opts "$GUNICORN_OPTS" \
    --backend-store-uri "$BACKEND" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS"

# Wait for GET /health (the first start creates the database schema: a few seconds).
if ! "$PY" - "$URI/health" "$(cat "$PIDFILE")" "${START_TIMEOUT_S:-90}" <<'PYEOF'
import os, sys, time, urllib.request
url, pid, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + limit
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                break
    except Exception as exc:
        err = exc
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("mlflow server exited")
    if time.time() > deadline:
        sys.exit(f"mlflow server did not answer {url} in {limit:.0f} s: {err}")
    time.sleep(0.2)
PYEOF
then
    say "--- $LOG"; tail -n 30 "$LOG" >&2 || true
    kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
    die "MLflow did not start"
fi

cat >"$ENVFILE" <<ENVEOF
export MLFLOW_TRACKING_URI=$URI
export PFSTORER_TRACKING_URI=$URI
ENVEOF
say "MLflow at $URI (backend $BACKEND, artifacts $ARTIFACTS, pid $(cat "$PIDFILE"), log $LOG)"
cat "$ENVFILE"
