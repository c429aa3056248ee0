#!/usr/bin/env bash
# End-to-end check of docker/compose.yaml, run the way its users run it: build the image once for both services,
# `up` with the sim profile, wait for healthy containers, stop the asyncraft service in the middle of the job
# (SIGTERM, grace, exit 75), start it again, wait for it to finish, copy the export out of the volume to the host,
# and check that the export is complete, `verify` is clean, no call was paid twice and the API key is nowhere in
# the volume or the logs; then `down -v`.
#
#   docker/test_compose.sh                       # podman-compose if installed, else docker compose; base python:3.11-slim
#   BASE=localhost/pybase:3.11 BUILD_OPTS="-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro" \
#       docker/test_compose.sh                   # a local base image and a CA for pip (see docker/README.md)
#
# The stack is the example as shipped (docker/env.example, docker/input/requests.jsonl), changed only the way a user
# changes it: an env file made from env.example, and an override file (written to a temporary directory) that gives
# the project its own image tag, host ports and env file, so a user's own stack and images are left alone.
# Ports are published on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${COMPOSE:-}" ]; then
    if command -v podman-compose >/dev/null 2>&1; then COMPOSE=podman-compose; else COMPOSE="docker compose"; fi
fi
case "$COMPOSE" in podman-compose*) ENGINE=podman ;; *) ENGINE=docker ;; esac
BASE=${BASE:-python:3.11-slim}
BUILD_OPTS=${BUILD_OPTS:-}
GLOBAL=()
if [ "$ENGINE" = podman ]; then
    # --format docker keeps the image's HEALTHCHECK (the OCI format drops it).
    GLOBAL=(--podman-build-args "--format docker $BUILD_OPTS")
elif [ -n "$BUILD_OPTS" ]; then
    echo "BUILD_OPTS is passed to podman build; docker compose has no equivalent" >&2; exit 2
fi
IMAGE=${IMAGE:-asyncraft:compose-test}
PROJECT=asyncraft-compose-test-$$
KEY=compose-test-key-not-real-0123456789
INPUT=docker/input/requests.jsonl
WORK=$(mktemp -d)
T0=$SECONDS

STEP=start
step() { STEP=$*; printf '\n== [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
quiet() {  # podman without systemd cannot schedule health-check timers and says so on every container start
    grep -vE 'unable to get systemd connection|failed to connect to syslog' || true
}
compose() {  # the stack, with its project name, override file and the sim profile; stderr filtered (see quiet)
    # shellcheck disable=SC2086
    { $COMPOSE "${GLOBAL[@]}" -p "$PROJECT" -f docker/compose.yaml -f "$WORK/compose.test.yaml" --profile sim "$@" \
        2>&1 1>&3 3>&- | quiet >&2; } 3>&1
}
fail() {
    printf '\nFAILED: %s\n' "$*"
    compose logs --no-color --tail 30 asyncraft 2>&1 | sed 's/^/    /' || true
    FAILED=yes
    exit 1
}
FAILED=""
cleanup() {
    local code=$?
    if [ "$code" != 0 ] && [ -z "$FAILED" ]; then
        printf '\nFAILED: a command of step "%s" exited %s\n' "$STEP" "$code"
    fi
    compose down -v -t 5 >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
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
container_of() {  # SERVICE -> its container (both tools set these labels); called before any `compose run`
    $ENGINE ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}'
}
healthy() {  # CONTAINER -> exit 0 when its health check passes
    if [ "$ENGINE" = podman ]; then
        # No systemd timers here to schedule podman's checks: run the service's health check ourselves.
        $ENGINE healthcheck run "$1" >/dev/null 2>&1
    else
        [ "$($ENGINE inspect --format '{{.State.Health.Status}}' "$1")" = healthy ]
    fi
}
show() {  # PATTERN: the matching lines of stdin, indented (none is not an error: the checks come after)
    { grep -E "$1" || true; } | sed 's/^/    /'
}
exit_code() { $ENGINE inspect --format '{{.State.ExitCode}}' "$1"; }

MPORT=$(free_port)
SIM_PORT=$(free_port)
N=$(grep -c . "$INPUT")

# The user's steps: cp docker/env.example docker/asyncraft.env, then edit. Here: a one-shot job (the example's
# ASYNCRAFT_WATCH=1 keeps the service up for ever), a key to look for afterwards, and 4 calls at a time so that the
# 200 example requests take long enough (~20 s at the simulator's 300 ms) to be stopped in the middle.
grep -vE '^ASYNCRAFT_(WATCH|API_KEY|CONCURRENCY|PROGRESS_INTERVAL|PRICE_INPUT_PER_M|PRICE_OUTPUT_PER_M)=' \
    docker/env.example > "$WORK/asyncraft.env"
cat >> "$WORK/asyncraft.env" <<EOF
ASYNCRAFT_WATCH=0
ASYNCRAFT_API_KEY=$KEY
ASYNCRAFT_CONCURRENCY=4
ASYNCRAFT_PROGRESS_INTERVAL=2
ASYNCRAFT_PRICE_INPUT_PER_M=0.15
ASYNCRAFT_PRICE_OUTPUT_PER_M=0.60
EOF
# An override file, as a user keeps local changes out of compose.yaml (!override needs Docker Compose 2.24.4+).
cat > "$WORK/compose.test.yaml" <<EOF
services:
  asyncraft:
    image: $IMAGE
    env_file: !override ["$WORK/asyncraft.env"]
    ports: !override ["127.0.0.1:$MPORT:9100"]
    healthcheck: {interval: 2s, start_period: 5s}
  sim:
    image: $IMAGE
    ports: ["127.0.0.1:$SIM_PORT:8000"]      # for the simulator's /_sim/stats
    healthcheck: {interval: 2s, start_period: 5s}
EOF

step "build with $COMPOSE (BASE=$BASE)"
$COMPOSE version 2>/dev/null | sed 's/^/    /' || true
compose build --build-arg BASE="$BASE" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "build"; }
builds=$(grep -cE "COMMIT $IMAGE|naming to .*$IMAGE" "$WORK/build.log" || true)
image_id=$($ENGINE image inspect --format '{{.Id}}' "$IMAGE")
echo "images built: $builds ($IMAGE, ${image_id:0:12}), for the services: $(compose config --services | paste -sd ' ')"
[ "$builds" = 1 ] || fail "expected one image build for both services, saw $builds"

step "up -d with the sim profile (metrics on 127.0.0.1:$MPORT, simulator on 127.0.0.1:$SIM_PORT)"
compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "up"; }
APP=$(container_of asyncraft)
SIM=$(container_of sim)
[ -n "$APP" ] && [ -n "$SIM" ] || fail "containers not found (asyncraft: '$APP', sim: '$SIM')"
app_image=$($ENGINE inspect --format '{{.Image}}' "$APP")
sim_image=$($ENGINE inspect --format '{{.Image}}' "$SIM")
echo "$APP and $SIM run image ${app_image:0:12} and ${sim_image:0:12}"
[ "$app_image" = "$image_id" ] && [ "$sim_image" = "$image_id" ] || fail "the services do not run the one built image"

step "wait until both containers are healthy"
for c in "$SIM" "$APP"; do
    ok=""
    for _ in $(seq 120); do
        if healthy "$c"; then ok=yes; break; fi
        sleep 0.5
    done
    [ -n "$ok" ] || fail "$c never healthy"
    echo "$c: healthy"
done
echo "/healthz: $(http_get "http://127.0.0.1:$MPORT/healthz")"

step "wait until a quarter of the job is done, then stop the asyncraft service (SIGTERM)"
for _ in $(seq 300); do
    done_now=$(metric 'asyncraft_tasks{state="done"}')
    [ "${done_now%.*}" -ge $((N / 4)) ] && break
    sleep 0.2
done
echo "done before the stop: $(metric 'asyncraft_tasks{state="done"}') of $N"
t=$SECONDS
compose stop asyncraft >/dev/null
code=$(exit_code "$APP")
echo "stopped in $((SECONDS - t))s with exit status $code (75 = stopped before the end, resumable)"
[ "$code" = 75 ] || fail "exit status $code after SIGTERM, expected 75"
$ENGINE logs "$APP" 2>&1 | show 'SIGTERM|stopped'
paid_before=$(http_get "http://127.0.0.1:$SIM_PORT/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["paid"])')
echo "paid calls so far: $paid_before"
[ "$paid_before" -lt "$N" ] || fail "the job was finished before the stop; nothing was resumed"

step "start the asyncraft service again; it must resume and finish"
compose start asyncraft >/dev/null
code=$($ENGINE wait "$APP")
echo "second run ended with exit status $code"
[ "$code" = 0 ] || fail "exit status $code after the restart, expected 0"
$ENGINE logs "$APP" 2>&1 | show 'recovered|finished'

step "export into the volume, copy it out to the host, verify, status"
# `run --rm` works whether the service is running (ASYNCRAFT_WATCH=1) or has exited; -T keeps the copied bytes
# clean (no terminal), so .parquet comes out intact as well.
compose run --rm --no-deps -T asyncraft export --format prompts --out /data/results.jsonl 2>&1 \
    | tee -a "$WORK/runs.log" | sed 's/^/    /'
compose run --rm --no-deps -T --entrypoint cat asyncraft /data/results.jsonl > "$WORK/results.jsonl"
echo "    copied: results.jsonl, $(wc -c < "$WORK/results.jsonl") bytes"
compose run --rm --no-deps -T asyncraft verify > "$WORK/verify.log" 2>&1 || { cat "$WORK/verify.log"; fail "verify"; }
sed 's/^/    /' "$WORK/verify.log" | tee -a "$WORK/runs.log"
compose run --rm --no-deps -T asyncraft status 2>&1 | tee -a "$WORK/runs.log" | sed 's/^/    /'
http_get "http://127.0.0.1:$SIM_PORT/_sim/stats" > "$WORK/sim.json"
python3 - "$WORK/results.jsonl" "$INPUT" "$WORK/sim.json" <<'PY'
import collections, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
want = [json.loads(line)["custom_id"] for line in open(sys.argv[2]) if line.strip()]
status = collections.Counter(r["status"] for r in rows)
ids = [r["custom_id"] for r in rows]
sim = json.load(open(sys.argv[3]))
twice = sum(1 for v in sim["paid_by_hash"].values() if v > 1)
print(f"export: {len(rows)} rows, {dict(status)}, custom_ids in input order: {ids == want}")
print(f"simulator: {sim['paid']} paid calls for {len(want)} requests, {twice} paid twice, "
      f"{sim['by_status'].get('429', 0)} answered 429, {sim['by_status'].get('500', 0)} answered 500")
assert ids == want and status == {"ok": len(want)}, "incomplete export"
assert sim["paid"] == len(want) and twice == 0, "a call was paid twice across the stop and restart"
PY

step "the API key is nowhere in the volume or the logs"
# The whole volume, copied out the same way (a tar stream through `run -T`), then searched on the host.
mkdir "$WORK/volume"
compose run --rm --no-deps -T --entrypoint tar asyncraft -C /data -cf - . | tar -C "$WORK/volume" -xf -
compose logs --no-color > "$WORK/logs.txt" 2>&1
cat "$WORK/runs.log" >> "$WORK/logs.txt"
if grep -rqF "$KEY" "$WORK/volume" "$WORK/logs.txt"; then fail "the API key leaked"; fi
echo "not found in $(find "$WORK/volume" -type f | wc -l) files of the volume nor in $(wc -l < "$WORK/logs.txt") log lines"

step "down -v"
compose down -v >/dev/null 2>&1
left=$(for what in "ps -a" "volume ls" "network ls"; do
           # shellcheck disable=SC2086
           $ENGINE $what -q --filter "label=com.docker.compose.project=$PROJECT"
       done)
[ -z "$left" ] || fail "down -v left: $left"
echo "no container, volume or network of the project is left"

step "ALL CHECKS PASSED in $((SECONDS - T0))s"
