#!/usr/bin/env bash
# End-to-end check of the image: build it, run it against the simulator (itself a container), wait for a healthy
# /healthz, read /metrics, stop it with SIGTERM in the middle of the job, start the same container again, and
# check that the job resumed and finished: a complete export, verify clean, no call paid twice, no key on disk.
#
#   docker/test_container.sh                     # podman if installed, else docker; base python:3.11-slim
#   BASE=localhost/pybase:3.11 BUILD_OPTS="-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro" \
#       docker/test_container.sh                 # a local base image and a CA for pip (see docker/README.md)
#
# Everything listens on 127.0.0.1 (host network); nothing is published beyond this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
IMAGE=${IMAGE:-asyncraft:test}
BASE=${BASE:-python:3.11-slim}
BUILD_OPTS=${BUILD_OPTS:-}
N=${N:-600}
CONCURRENCY=16
KEY=container-test-key-not-real-0123456789
NAME=asyncraft-test-$$
SIM=asyncraft-test-sim-$$
WORK=$(mktemp -d)
T0=$SECONDS

step() { printf '\n== [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() { printf '\nFAILED: %s\n' "$*"; $ENGINE logs --tail 30 "$NAME" 2>&1 | sed 's/^/    /' || true; exit 1; }
cleanup() {
    $ENGINE rm -f "$NAME" "$SIM" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
quiet() {  # podman without systemd cannot schedule health-check timers and says so on every start
    grep -v 'unable to get systemd connection' >&2 || true
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_get() {  # URL -> body (exit 1 on an HTTP error or no answer)
    python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode()); sys.exit(1)
except OSError:
    sys.exit(1)
PY
}
metric() {  # NAME{LABELS} -> value from /metrics (0 when absent)
    http_get "http://127.0.0.1:$MPORT/metrics" | awk -v k="$1" '$1 == k {print $2; found=1} END {if (!found) print 0}'
}

SIM_PORT=$(free_port)
MPORT=$(free_port)
VOL=""
if [ "$ENGINE" = podman ]; then
    VOL=":U"              # chown the bind mount to the image's non-root user
    FORMAT="--format docker"   # keep HEALTHCHECK (the OCI image format drops it)
else
    FORMAT=""
fi
mkdir -p "$WORK/data" "$WORK/input"
[ "$ENGINE" = podman ] || chmod 0777 "$WORK/data"

step "build $IMAGE with $ENGINE (BASE=$BASE)"
# shellcheck disable=SC2086
$ENGINE build $FORMAT --build-arg BASE="$BASE" $BUILD_OPTS -t "$IMAGE" -f docker/Dockerfile . >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "build"; }
echo "built: $($ENGINE image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-19), healthcheck:" \
     "$($ENGINE image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")"
echo "user: $($ENGINE image inspect --format '{{.Config.User}}' "$IMAGE"), entrypoint:" \
     "$($ENGINE image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")"

step "write $N requests; start the simulator on 127.0.0.1:$SIM_PORT"
python3 - "$WORK/input/requests.jsonl" "$N" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"custom_id": f"req-{i}", "body": {"messages": [
            {"role": "user", "content": f"Tell me fact number {i}."}], "max_tokens": 32}}) + "\n")
PY
$ENGINE run -d --name "$SIM" --network host --no-healthcheck "$IMAGE" simulate --host 127.0.0.1 --port "$SIM_PORT" \
    --latency-ms 200 --latency-dist lognormal --p-429 0.02 --fault-retry-after 0.5 >/dev/null
for _ in $(seq 100); do http_get "http://127.0.0.1:$SIM_PORT/v1/models" >/dev/null && break; sleep 0.2; done
http_get "http://127.0.0.1:$SIM_PORT/v1/models" >/dev/null || fail "the simulator did not start"

step "start asyncraft (metrics and health on 127.0.0.1:$MPORT)"
$ENGINE run -d --name "$NAME" --network host --stop-timeout 45 \
    --health-interval 2s --health-start-period 5s \
    -v "$WORK/data:/data$VOL" -v "$WORK/input:/input:ro" \
    -e ASYNCRAFT_INPUT=/input/requests.jsonl -e ASYNCRAFT_BASE_URL="http://127.0.0.1:$SIM_PORT/v1" \
    -e ASYNCRAFT_MODEL=sim-1 -e ASYNCRAFT_API_KEY="$KEY" -e ASYNCRAFT_CONCURRENCY=$CONCURRENCY \
    -e ASYNCRAFT_METRICS_HOST=127.0.0.1 -e ASYNCRAFT_METRICS_PORT="$MPORT" -e ASYNCRAFT_PROGRESS_INTERVAL=2 \
    -e ASYNCRAFT_PRICE_INPUT_PER_M=0.15 -e ASYNCRAFT_PRICE_OUTPUT_PER_M=0.60 -e ASYNCRAFT_SNAPSHOT_EVERY=100 \
    "$IMAGE" run >/dev/null 2> >(quiet)

step "wait for a healthy container"
healthy=""
for _ in $(seq 60); do
    if [ "$ENGINE" = podman ]; then
        # No systemd timers here to schedule podman's checks: run the image's HEALTHCHECK ourselves.
        if $ENGINE healthcheck run "$NAME" >/dev/null 2>&1; then healthy=yes; break; fi
    elif [ "$($ENGINE inspect --format '{{.State.Health.Status}}' "$NAME")" = healthy ]; then
        healthy=yes; break
    fi
    sleep 0.5
done
[ -n "$healthy" ] || fail "never healthy"
echo "healthcheck: healthy; /healthz says: $(http_get "http://127.0.0.1:$MPORT/healthz")"

step "scrape /metrics while it runs"
http_get "http://127.0.0.1:$MPORT/metrics" | grep -E '^asyncraft_(tasks|in_flight|tokens_total|cost_total|journal_bytes_total|call_latency_seconds_count)' \
    | sed 's/^/    /'

step "wait until a quarter of the job is done, then stop with SIGTERM"
for _ in $(seq 300); do
    done_now=$(metric 'asyncraft_tasks{state="done"}')
    [ "${done_now%.*}" -ge $((N / 4)) ] && break
    sleep 0.2
done
echo "done before the stop: $(metric 'asyncraft_tasks{state="done"}')"
t=$SECONDS
$ENGINE stop -t 45 "$NAME" >/dev/null 2> >(quiet)
code=$($ENGINE inspect --format '{{.State.ExitCode}}' "$NAME")
echo "stopped in $((SECONDS - t))s with exit status $code (75 = stopped before the end, resumable)"
[ "$code" = 75 ] || fail "exit status $code after SIGTERM, expected 75"
$ENGINE logs "$NAME" 2>&1 | grep -E 'SIGTERM|stopped' | sed 's/^/    /'
paid_before=$(http_get "http://127.0.0.1:$SIM_PORT/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["paid"])')
echo "paid calls so far: $paid_before"

step "start the same container again; it must resume and finish"
$ENGINE start "$NAME" >/dev/null 2> >(quiet)
code=$($ENGINE wait "$NAME")
echo "second run ended with exit status $code"
[ "$code" = 0 ] || fail "exit status $code after the restart, expected 0"
$ENGINE logs "$NAME" 2>&1 | grep -E 'recovered|finished' | sed 's/^/    /'

step "export, verify and count"
$ENGINE run --rm --network none --no-healthcheck -v "$WORK/data:/data$VOL" -v "$WORK/input:/input:ro" \
    -e ASYNCRAFT_INPUT=/input/requests.jsonl "$IMAGE" export --format prompts --out /data/results.jsonl 2>&1 \
    | sed 's/^/    /'
$ENGINE run --rm --network none --no-healthcheck -v "$WORK/data:/data$VOL" "$IMAGE" verify 2>&1 | sed 's/^/    /'
$ENGINE run --rm --network none --no-healthcheck -v "$WORK/data:/data$VOL" -e ASYNCRAFT_PRICE_INPUT_PER_M=0.15 \
    -e ASYNCRAFT_PRICE_OUTPUT_PER_M=0.60 "$IMAGE" status 2>&1 | sed 's/^/    /'
http_get "http://127.0.0.1:$SIM_PORT/_sim/stats" > "$WORK/sim.json"
python3 - "$WORK/data/results.jsonl" "$N" "$WORK/sim.json" <<'PY'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
n = int(sys.argv[2])
status = collections.Counter(r["status"] for r in rows)
ids = [r["custom_id"] for r in rows]
sim = json.load(open(sys.argv[3]))
twice = sum(1 for v in sim["paid_by_hash"].values() if v > 1)
print(f"export: {len(rows)} rows, {dict(status)}, custom_ids in input order: {ids == [f'req-{i}' for i in range(n)]}")
print(f"simulator: {sim['paid']} paid calls for {n} requests, {twice} paid twice, "
      f"{sim['by_status'].get('429', 0)} answered 429")
assert len(rows) == n and status == {"ok": n} and ids == [f"req-{i}" for i in range(n)], "incomplete export"
assert sim["paid"] == n and twice == 0, "a call was paid twice across the stop and restart"
PY

step "the API key is nowhere on disk or in the logs"
if grep -rqF "$KEY" "$WORK/data" || $ENGINE logs "$NAME" 2>&1 | grep -qF "$KEY"; then fail "the API key leaked"; fi
echo "not found in $(find "$WORK/data" -type f | wc -l) files of the state volume nor in the logs"

step "ALL CHECKS PASSED in $((SECONDS - T0))s"
