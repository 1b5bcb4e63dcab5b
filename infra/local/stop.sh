#!/usr/bin/env bash
# Stop what start_mlflow.sh and start_s3.sh started (by their recorded process groups).
#   infra/local/stop.sh            # both
#   infra/local/stop.sh mlflow     # or: s3
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_one() {  # NAME PATTERN
    local name="$1" pattern="$2" pidfile="$RUN_DIR/$1.pid" pid i
    if ! alive "$pidfile" "$pattern"; then
        say "$name: not running"
        rm -f "$pidfile" "$RUN_DIR/$name.env"
        return 0
    fi
    pid="$(cat "$pidfile")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do  # up to 10 s
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        say "$name: still running after 10 s, sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile" "$RUN_DIR/$name.env"
    say "$name: stopped (pid $pid)"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(mlflow s3)
for t in "${targets[@]}"; do
    case "$t" in
        mlflow) stop_one mlflow mlflow ;;
        s3) stop_one s3 moto_server ;;
        *) die "unknown service '$t' (mlflow or s3)" ;;
    esac
done
