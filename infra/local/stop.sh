#!/usr/bin/env bash
# Stop what start_mlflow.sh, start_s3.sh and start_postgres.sh started (by their recorded
# process groups; PostgreSQL by a fast shutdown of its postmaster, then its data dir is deleted).
#   infra/local/stop.sh            # all of them
#   infra/local/stop.sh mlflow     # or: s3, postgres
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_one() {  # NAME PATTERN [SIGNAL: to the leader only, before the group's SIGTERM]
    local name="$1" pattern="$2" first="${3:-}" pidfile="$RUN_DIR/$1.pid" pid i
    if ! alive "$pidfile" "$pattern"; then
        say "$name: not running"
        rm -f "$pidfile" "$RUN_DIR/$name.env"
        return 0
    fi
    pid="$(cat "$pidfile")"
    if [ -n "$first" ]; then
        kill "-$first" "$pid" 2>/dev/null
        for i in $(seq 1 100); do  # up to 10 s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
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
[ ${#targets[@]} -gt 0 ] || targets=(mlflow s3 postgres)
for t in "${targets[@]}"; do
    case "$t" in
        mlflow) stop_one mlflow mlflow ;;
        s3) stop_one s3 moto_server ;;
        postgres)
            stop_one postgres postgres INT  # fast shutdown: the postmaster ends its backends
            rm -rf "$RUN_DIR/postgres"      # throwaway data
            ;;
        *) die "unknown service '$t' (mlflow, s3 or postgres)" ;;
    esac
done
