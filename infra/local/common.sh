# Shared by the infra/local scripts (sourced, not run). Loopback only: servers bind 127.0.0.1.
# Knobs (environment):
#   PFSTORER_VENV       virtualenv with mlflow-skinny, moto[server], boto3   (default: <repo>/.venv)
#   PFSTORER_LOCAL_DIR  pid files, logs, SQLite DB, artifacts, env files    (default: <repo>/.pfstorer-state/local)
#   BIND_ADDRESS        interface to bind                                   (default: 127.0.0.1)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PFSTORER_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
RUN_DIR="${PFSTORER_LOCAL_DIR:-$REPO/.pfstorer-state/local}"
BIND_ADDRESS="${BIND_ADDRESS:-127.0.0.1}"

# Offline and private: no telemetry from MLflow or Ray.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_USAGE_STATS_ENABLED=0

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_venv() {
    [ -x "$PY" ] || die "no virtualenv at $VENV (run 'make install' or set PFSTORER_VENV)"
    [ -x "$VENV/bin/$1" ] || die "$VENV/bin/$1 not found (pip install $2 into $VENV)"
}

# alive PIDFILE PATTERN: true if the pid in PIDFILE runs and its command line matches PATTERN
alive() {
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    ps -p "$pid" -o command= 2>/dev/null | grep -q -- "$2"
}

# service NAME: set PIDFILE, LOG and ENVFILE of a service under RUN_DIR (created)
service() {
    mkdir -p "$RUN_DIR"
    PIDFILE="$RUN_DIR/$1.pid" LOG="$RUN_DIR/$1.log" ENVFILE="$RUN_DIR/$1.env"
}

# running_already LABEL PATTERN: if the service runs, print its exports again and exit 0
running_already() {
    if alive "$PIDFILE" "$2"; then
        say "$1 already running (pid $(cat "$PIDFILE")); its settings:"
        cat "$ENVFILE"
        exit 0
    fi
}

# port_free HOST PORT: true if nothing listens there
port_free() {
    "$PY" - "$1" "$2" <<'PYEOF'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PYEOF
}

# start_daemon PIDFILE LOG CMD...: run CMD in its own process group (pgid == pid), detached
# from this shell's stdin/stdout, and record its pid. stop.sh signals the whole group.
start_daemon() {
    local pidfile="$1" log="$2"
    shift 2
    set -m
    nohup "$@" >"$log" 2>&1 </dev/null &
    local pid=$!
    set +m
    echo "$pid" >"$pidfile"
}
