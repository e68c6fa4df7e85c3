#!/usr/bin/env bash
# triomesh benchmark: direct vs one sidecar hop vs the sidecar pair (outbound -> inbound -> app), with wrk.
#
#   bench/run.sh [-d SECONDS] [-c CONNECTIONS] [--one-core]
#
# Starts an nginx backend (1 KiB responses, keep-alive), a hop sidecar and a plaintext sidecar pair on
# 127.0.0.1, then runs `wrk -t1 -cC -dD --latency` against each and prints rps, p50 and p99 and the
# sidecars' CPU per request. Needs wrk and nginx (Debian: apt-get install wrk nginx-light) and the project
# venv (.venv, made by ./scripts/test). Every process it starts is stopped when it exits.
# The mTLS pair and comparisons with Envoy and HAProxy run through ../shared/bench/peers.sh with
# bench/triomesh-adapter (see docs/performance.md).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=$ROOT/.venv/bin/python
DURATION=10
CONNS=32
ONE_CORE=0
while (($#)); do
    case $1 in
    -d) DURATION=$2; shift 2 ;;
    -c) CONNS=$2; shift 2 ;;
    --one-core) ONE_CORE=1; shift ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in wrk nginx; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (apt-get install wrk nginx-light)" >&2; exit 1; }
done
[[ -x $PY ]] || { echo "run.sh: $PY is missing; run ./scripts/test once to create the venv" >&2; exit 1; }

BACKEND=28080 HOP=28100 OUT=28110 IN=28111
for port in $BACKEND $HOP $OUT $IN; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "run.sh: port $port is already in use; stop what listens there first" >&2
        exit 1
    fi
done
RUN=$(mktemp -d /tmp/triomesh-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
PIN=()
((ONE_CORE)) && PIN=(taskset -c 0)
pin() { "${PIN[@]}" "$@"; }

body=$(head -c 1024 /dev/zero | tr '\0' 'x')
cat >"$RUN/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $RUN/nginx.pid; error_log $RUN/nginx-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 300s; client_body_temp_path $RUN;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "$body"; } } }
NGINX
"${PIN[@]}" nginx -p "$RUN/" -c "$RUN/nginx.conf" &
PIDS+=($!)

cat >"$RUN/inbound.yaml" <<YAML
service: {name: app, app: 127.0.0.1:$BACKEND}
inbound: {bind: 127.0.0.1:$IN, tls: "off"}
admin: {bind: 127.0.0.1:0}
YAML
cat >"$RUN/outbound.yaml" <<YAML
service: {name: client, app: 127.0.0.1:1}
upstreams: [{service: app, bind: 127.0.0.1:$OUT, tls: "off"}]
discovery: {static: {app: [127.0.0.1:$IN]}}
admin: {bind: 127.0.0.1:0}
YAML
"${PIN[@]}" "$PY" -m sidecar.bench_entry hop "$HOP" "$BACKEND" 2>"$RUN/hop.log" &
HOP_PID=$!
"${PIN[@]}" "$PY" -m mesh.cli sidecar run --config "$RUN/inbound.yaml" 2>"$RUN/inbound.log" &
IN_PID=$!
"${PIN[@]}" "$PY" -m mesh.cli sidecar run --config "$RUN/outbound.yaml" 2>"$RUN/outbound.log" &
OUT_PID=$!
PIDS+=("$HOP_PID" "$IN_PID" "$OUT_PID")

wait_up() { # PORT
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    echo "run.sh: nothing answers on port $1; logs in $RUN" >&2
    exit 1
}
for port in $BACKEND $HOP $OUT; do wait_up "$port"; done

cpu_s() { # PID... -> summed utime+stime in seconds
    local total=0 pid
    for pid in "$@"; do total=$((total + $(awk '{print $14+$15}' "/proc/$pid/stat"))); done
    echo "$total $(getconf CLK_TCK)" | awk '{printf "%.3f", $1/$2}'
}

printf '%-14s %10s %9s %9s %18s\n' scenario rps p50_ms p99_ms "sidecar_cpu_us/req"
measure() { # NAME PORT PIDS...
    local name=$1 port=$2 before after out rps p50 p99 reqs
    shift 2
    pin wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$port/" >/dev/null # warm-up
    before=$( (($#)) && cpu_s "$@" || echo 0)
    out=$(pin wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/")
    after=$( (($#)) && cpu_s "$@" || echo 0)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    printf '%-14s %10s %9s %9s %18s\n' "$name" "$rps" "$p50" "$p99" \
        "$( (($#)) && awk -v a="$after" -v b="$before" -v n="$reqs" 'BEGIN {printf "%.1f", (a-b)*1e6/n}' || echo -)"
}
measure direct "$BACKEND"
measure sidecar-hop "$HOP" "$HOP_PID"
measure sidecar-pair "$OUT" "$OUT_PID" "$IN_PID"
echo "# wrk -t1 -c$CONNS -d${DURATION}s, 1 KiB responses; one_core=$ONE_CORE; logs in $RUN" >&2
