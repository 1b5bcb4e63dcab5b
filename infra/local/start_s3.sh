#!/usr/bin/env bash
# Start a local S3 server (moto) on 127.0.0.1 and create a bucket in it.
#
#   eval "$(infra/local/start_s3.sh)"          # stdout is only `export ...` lines; messages go to stderr
#
# Knobs: S3_PORT (or PORT, default 5001), BUCKET (default pfstorer), plus those in common.sh.
# Data lives in memory: it is gone when the server stops. Stop with infra/local/stop.sh.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PORT="${S3_PORT:-${PORT:-5001}}"
BUCKET="${BUCKET:-pfstorer}"
service s3

need_venv moto_server 'moto[server]'

running_already "local S3" moto_server
port_free "$BIND_ADDRESS" "$PORT" || die "port $PORT on $BIND_ADDRESS is in use (set S3_PORT)"

ENDPOINT="http://$BIND_ADDRESS:$PORT"
start_daemon "$PIDFILE" "$LOG" "$VENV/bin/moto_server" -H "$BIND_ADDRESS" -p "$PORT"

# Wait until it answers, then create the bucket (idempotent).
if ! "$PY" - "$ENDPOINT" "$BUCKET" "$(cat "$PIDFILE")" <<'PYEOF'
import os, sys, time
import boto3
endpoint, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
deadline = time.time() + 30
while True:
    try:
        names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
        if bucket not in names:
            s3.create_bucket(Bucket=bucket)
        break
    except Exception as exc:  # not up yet
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"moto_server exited: {exc}")
        if time.time() > deadline:
            sys.exit(f"moto_server did not answer in 30 s: {exc}")
        time.sleep(0.1)
PYEOF
then
    say "--- $LOG"; tail -n 20 "$LOG" >&2 || true
    kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
    die "local S3 did not start"
fi

cat >"$ENVFILE" <<ENVEOF
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL=$ENDPOINT
export MLFLOW_S3_ENDPOINT_URL=$ENDPOINT
export PFSTORER_STORAGE_OPTIONS='{"endpoint_url": "$ENDPOINT", "key": "testing", "secret": "testing"}'
export PFSTORER_S3_BUCKET=$BUCKET
ENVEOF
say "local S3 (moto) at $ENDPOINT, bucket s3://$BUCKET (pid $(cat "$PIDFILE"), log $LOG)"
cat "$ENVFILE"
