#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for MLflow's backend store (the local stand-in for
# infra/k8s/postgres.yaml: user `mlflow`, database `mlflow`, password authentication over TCP).
#
#   eval "$(infra/local/start_postgres.sh)"    # stdout is only `export ...` lines; messages go to stderr
#   eval "$(infra/local/start_mlflow.sh)"      # then picks MLFLOW_BACKEND_STORE_URI up from the exports
#
# Needs the PostgreSQL server binaries (initdb, postgres; Debian: `apt-get install postgresql`,
# which puts them in /usr/lib/postgresql/<version>/bin) and psycopg2 in the virtualenv
# (`pip install psycopg2-binary`, part of the dev extra).
#
# Knobs:
#   PG_PORT (or PORT)   default 5432
#   PG_BIN              directory of initdb/postgres (default: found on PATH, then /usr/lib/postgresql/*/bin)
#   PG_USER / PG_DB     default mlflow / mlflow (as in infra/k8s)
#   PG_PASSWORD         default mlflow-local (loopback only, throwaway data)
#   PG_RUN_AS           user that runs the server when this script runs as root (initdb refuses
#                       root); default `postgres` if that user exists, else `nobody`
#   PG_OPTIONS          extra server settings, e.g. "-c fsync=off" for tests (default: none)
# plus those in common.sh. The data directory is $PFSTORER_LOCAL_DIR/postgres; `stop.sh postgres`
# stops the server and deletes it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${PG_PORT:-${PORT:-5432}}"
PG_USER="${PG_USER:-mlflow}"
PG_DB="${PG_DB:-mlflow}"
PG_PASSWORD="${PG_PASSWORD:-mlflow-local}"
service postgres
DATA="$RUN_DIR/postgres"

"$PY" -c "import psycopg2" 2>/dev/null \
    || die "psycopg2 missing in $VENV (pip install psycopg2-binary, or make install)"
if [ -z "${PG_BIN:-}" ]; then
    if command -v initdb >/dev/null 2>&1; then
        PG_BIN="$(dirname "$(command -v initdb)")"
    else
        PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    fi
fi
[ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/postgres" ] \
    || die "PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)"

running_already "PostgreSQL" postgres
port_free "$BIND_ADDRESS" "$PORT" || die "port $PORT on $BIND_ADDRESS is in use (set PG_PORT)"

# initdb and postgres refuse to run as root: drop to an unprivileged user (setpriv execs, so the
# recorded pid is the server's own).
AS=()
if [ "$(id -u)" = 0 ]; then
    RUN_AS="${PG_RUN_AS:-$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)}"
    command -v setpriv >/dev/null 2>&1 || die "running as root needs setpriv (util-linux) to drop to $RUN_AS"
    AS=(setpriv --reuid="$(id -u "$RUN_AS")" --regid="$(id -g "$RUN_AS")" --clear-groups)
    chmod o+x "$RUN_DIR"
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"
    mkdir -p "$DATA"
    PWFILE="$(mktemp "$RUN_DIR/pgpass.XXXXXX")"
    printf '%s\n' "$PG_PASSWORD" >"$PWFILE"
    if [ ${#AS[@]} -gt 0 ]; then
        chown "$RUN_AS" "$DATA" "$PWFILE"
        "${AS[@]}" test -r "$PWFILE" || { rm -f "$PWFILE"; die "user $RUN_AS cannot reach $RUN_DIR: a parent \
directory is private (chmod o+x it, or set PFSTORER_LOCAL_DIR elsewhere)"; }
    fi
    if ! (cd / && "${AS[@]}" "$PG_BIN/initdb" -D "$DATA" -U "$PG_USER" --pwfile="$PWFILE" \
            --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-sync >"$RUN_DIR/initdb.log" 2>&1); then
        rm -f "$PWFILE"
        say "--- $RUN_DIR/initdb.log"; tail -n 20 "$RUN_DIR/initdb.log" >&2 || true
        die "initdb failed"
    fi
    rm -f "$PWFILE"
fi

# The socket goes into the data directory (the default /var/run/postgresql may not exist).
# shellcheck disable=SC2086
(cd / && start_daemon "$PIDFILE" "$LOG" "${AS[@]}" "$PG_BIN/postgres" -D "$DATA" -p "$PORT" \
    -c listen_addresses="$BIND_ADDRESS" -k "$DATA" ${PG_OPTIONS:-})

URI="postgresql+psycopg2://$PG_USER:$PG_PASSWORD@$BIND_ADDRESS:$PORT/$PG_DB"
# Wait until it takes connections, then create the database (idempotent).
if ! "$PY" - "$BIND_ADDRESS" "$PORT" "$PG_USER" "$PG_PASSWORD" "$PG_DB" "$(cat "$PIDFILE")" <<'PYEOF'
import os, sys, time
import psycopg2
host, port, user, password, db, pid = sys.argv[1:7]
deadline = time.time() + 60
while True:
    try:
        conn = psycopg2.connect(host=host, port=int(port), user=user, password=password,
                                dbname="postgres", connect_timeout=2)
        break
    except psycopg2.OperationalError as exc:
        err = exc
    try:
        os.kill(int(pid), 0)
    except OSError:
        sys.exit("postgres exited")
    if time.time() > deadline:
        sys.exit(f"postgres did not take connections in 60 s: {err}")
    time.sleep(0.2)
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
    if cur.fetchone() is None:
        cur.execute(f'CREATE DATABASE "{db}"')
conn.close()
PYEOF
then
    say "--- $LOG"; tail -n 30 "$LOG" >&2 || true
    kill -INT "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
    die "PostgreSQL did not start"
fi

cat >"$ENVFILE" <<ENVEOF
export MLFLOW_BACKEND_STORE_URI=$URI
ENVEOF
say "PostgreSQL at $BIND_ADDRESS:$PORT (database $PG_DB, user $PG_USER, data $DATA, pid $(cat "$PIDFILE"), log $LOG)"
cat "$ENVFILE"
