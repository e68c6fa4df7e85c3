#!/usr/bin/env bash
# Resilience scenario: a fixed-rate client -> proxy -> 3 endpoints (fast, failing, slow), per proxy config.
#
#   bench/resilience/run.sh [--duration S] [--rate R] [--configs "LIST"] [options]
#
#   --duration S       seconds of load per config (default 30)
#   --rate R           requests per second, open loop (default 200)
#   --configs "LIST"   any of triomesh-defaults triomesh-off envoy-defaults envoy-off
#                      (default: all four; an Envoy config is skipped if no envoy binary is found)
#   --connections N    the client's most connections / requests in flight (default 128)
#   --timeout S        client timeout per request, from its scheduled send time (default 5)
#   --fast-ms MS       service time of the fast and the failing endpoint (default 5)
#   --slow-ms MS       service time of the slow endpoint (default 100, 20x fast)
#   --fail-percent P   share of the failing endpoint's requests answered 503 (default 50)
#   --fail-pattern X   random (seeded, default) or alternate (deterministic)
#   --no-pin           do not pin the proxy to CPU 0 and client + backends to CPU 1
#   --keep             keep the temp run dir (configs, proxy logs, admin dumps)
#   -o DIR             results directory (default bench/resilience/results)
#
# Per config: fresh backends and a fresh proxy, readiness checks (backend ports, the proxy's admin
# /ready), no warm-up, then loadgen.py for the duration; then every process is stopped. Prints a table
# and writes results/<UTC time>.json and .md. Environment: ENVOY_BIN (default: envoy on PATH, then
# /tmp/bench-venv/bin/envoy), PORT_BASE (default 29000; uses +1..+3, +10, +11), PROXY_CPU / LOAD_CPU.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=$ROOT/.venv/bin/python
MESH=$ROOT/.venv/bin/mesh

DURATION=30 RATE=200 CONNECTIONS=128 TIMEOUT=5
FAST_MS=5 SLOW_MS=100 FAIL_PERCENT=50 FAIL_PATTERN=random
CONFIGS="triomesh-defaults triomesh-off envoy-defaults envoy-off"
PIN=1 KEEP=0 OUT=$HERE/results
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --connections) CONNECTIONS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --fast-ms) FAST_MS=$2; shift 2 ;;
    --slow-ms) SLOW_MS=$2; shift 2 ;;
    --fail-percent) FAIL_PERCENT=$2; shift 2 ;;
    --fail-pattern) FAIL_PATTERN=$2; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --keep) KEEP=1; shift ;;
    -o) OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for c in $CONFIGS; do
    case $c in
    triomesh-defaults | triomesh-off | envoy-defaults | envoy-off) ;;
    *) echo "run.sh: unknown config $c" >&2; exit 2 ;;
    esac
done
[[ -x $PY && -x $MESH ]] || { echo "run.sh: $ROOT/.venv is missing; run: cd $ROOT && .venv/bin/pip install -e '.[test]'" >&2; exit 1; }
command -v curl >/dev/null || { echo "run.sh: curl is missing" >&2; exit 1; }
ENVOY=${ENVOY_BIN:-$(command -v envoy || true)}
[[ -z $ENVOY && -x /tmp/bench-venv/bin/envoy ]] && ENVOY=/tmp/bench-venv/bin/envoy

BASE=${PORT_BASE:-29000}
FAST=$((BASE + 1)) FLAKY=$((BASE + 2)) SLOW=$((BASE + 3)) LISTEN=$((BASE + 10)) ADMIN=$((BASE + 11))
for port in $FAST $FLAKY $SLOW $LISTEN $ADMIN; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "run.sh: port $port is already in use (set PORT_BASE to move all ports)" >&2
        exit 1
    fi
done
PROXY_PIN=() LOAD_PIN=()
if ((PIN)) && command -v taskset >/dev/null && (($(nproc) >= 2)); then
    PROXY_PIN=(taskset -c "${PROXY_CPU:-0}") LOAD_PIN=(taskset -c "${LOAD_CPU:-1}")
fi

RUN=$(mktemp -d /tmp/resilience-bench.XXXXXX)
GROUPS_STARTED=()   # process group ids (every process is started with setsid, so pgid = pid)
group_alive() {     # any non-zombie process left in group $1?
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
stop_group() {      # TERM the whole group, KILL it after 5 s
    local pgid=$1 i
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        group_alive "$pgid" || return 0
        sleep 0.1
    done
    echo "run.sh: process group $pgid did not stop on TERM; killing it" >&2
    kill -KILL -- "-$pgid" 2>/dev/null || true
}
stop_all() {
    local pgid
    for pgid in "${GROUPS_STARTED[@]}"; do stop_group "$pgid"; done
    GROUPS_STARTED=()
    wait 2>/dev/null || true
}
cleanup() {
    stop_all
    if ((KEEP)); then echo "run dir kept: $RUN" >&2; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start() {   # start LOGFILE CMD...: a new session and process group; the pid is left in STARTED
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 </dev/null &
    STARTED=$!
    GROUPS_STARTED+=("$STARTED")
}
wait_port() {
    local port=$1 i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "run.sh: nothing listens on port $port after 10 s" >&2
    return 1
}
wait_ready() {   # wait_ready URL PID LOG
    local i
    for ((i = 0; i < 150; i++)); do
        curl -sf -o /dev/null --max-time 1 "$1" && return 0
        kill -0 "$2" 2>/dev/null || { echo "run.sh: the proxy exited during startup; its log:" >&2; tail -20 "$3" >&2; return 1; }
        sleep 0.1
    done
    echo "run.sh: $1 not ready after 15 s; the proxy's log:" >&2
    tail -20 "$3" >&2
    return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
render() {
    sed -e "s/@LISTEN@/$LISTEN/g" -e "s/@ADMIN@/$ADMIN/g" -e "s/@FAST@/$FAST/g" \
        -e "s/@FLAKY@/$FLAKY/g" -e "s/@SLOW@/$SLOW/g" "$HERE/conf/$1.yaml" >"$2"
}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain -- mesh sidecar 2>/dev/null | wc -l)
ENVOY_VERSION=""
[[ -n $ENVOY ]] && ENVOY_VERSION=$("$ENVOY" --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1 || true)
echo "resilience: rate $RATE/s for ${DURATION}s per config; endpoints fast ${FAST_MS} ms, failing ${FAST_MS} ms + ${FAIL_PERCENT} % 503 ($FAIL_PATTERN), slow ${SLOW_MS} ms; client timeout ${TIMEOUT}s; commit $COMMIT ($DIRTY uncommitted files in mesh/ sidecar/)" >&2

DONE_CONFIGS=()
for config in $CONFIGS; do
    dir=$RUN/$config
    mkdir -p "$dir"
    if [[ $config == envoy-* && -z $ENVOY ]]; then
        echo "$config: skipped (no envoy binary; set ENVOY_BIN)" >&2
        echo '{"skipped": "no envoy binary"}' >"$dir/proxy.json"
        DONE_CONFIGS+=("$config")
        continue
    fi
    echo "$config: starting backends and proxy" >&2
    start "$dir/fast.log" "${LOAD_PIN[@]}" "$PY" "$HERE/backend.py" --port "$FAST" --delay-ms "$FAST_MS" --name fast
    start "$dir/flaky.log" "${LOAD_PIN[@]}" "$PY" "$HERE/backend.py" --port "$FLAKY" --delay-ms "$FAST_MS" \
        --fail-percent "$FAIL_PERCENT" --fail-status 503 --fail-pattern "$FAIL_PATTERN" --seed 1 --name failing
    start "$dir/slow.log" "${LOAD_PIN[@]}" "$PY" "$HERE/backend.py" --port "$SLOW" --delay-ms "$SLOW_MS" --name slow
    for port in $FAST $FLAKY $SLOW; do wait_port "$port"; done

    render "$config" "$dir/proxy.yaml"
    if [[ $config == triomesh-* ]]; then
        "$MESH" config check "$dir/proxy.yaml" >/dev/null
        start "$dir/proxy.log" "${PROXY_PIN[@]}" "$MESH" sidecar run --config "$dir/proxy.yaml"
    else
        start "$dir/proxy.log" "${PROXY_PIN[@]}" "$ENVOY" -c "$dir/proxy.yaml" --concurrency 1 \
            --disable-hot-restart --log-level warn
    fi
    proxy=$STARTED
    wait_ready "http://127.0.0.1:$ADMIN/ready" "$proxy" "$dir/proxy.log"

    echo "$config: ${DURATION}s at $RATE/s" >&2
    ticks0=$(cpu_ticks "$proxy")
    t0=$(date +%s.%N)
    # In its own process group like the rest, and waited for with `wait`, so that a signal to this script
    # runs the trap at once (bash defers traps while a foreground child runs).
    start "$dir/loadgen.log" timeout $((${DURATION%.*} + ${TIMEOUT%.*} + 60)) "${LOAD_PIN[@]}" "$PY" \
        "$HERE/loadgen.py" --target "127.0.0.1:$LISTEN" --rate "$RATE" --duration "$DURATION" \
        --connections "$CONNECTIONS" --timeout "$TIMEOUT" --label "$config" \
        --backend-stats "127.0.0.1:$FAST,127.0.0.1:$FLAKY,127.0.0.1:$SLOW" --json-out "$dir/loadgen.json"
    rc=0
    wait "$STARTED" || rc=$?
    cat "$dir/loadgen.log" >&2
    ((rc == 0)) || { echo "run.sh: $config: the load generator failed (exit $rc)" >&2; exit 1; }
    t1=$(date +%s.%N)
    ticks1=$(cpu_ticks "$proxy")
    alive=1
    kill -0 "$proxy" 2>/dev/null || alive=0

    if [[ $config == triomesh-* ]]; then
        curl -sf --max-time 2 "http://127.0.0.1:$ADMIN/clusters" >"$dir/admin-clusters.json" || true
        curl -sf --max-time 2 "http://127.0.0.1:$ADMIN/metrics" >"$dir/admin-metrics.txt" || true
    else
        curl -sf --max-time 2 "http://127.0.0.1:$ADMIN/stats" >"$dir/admin-stats.txt" || true
    fi
    stop_all
    "$PY" - "$dir" "$ticks0" "$ticks1" "$t0" "$t1" "$alive" "$(getconf CLK_TCK)" <<'PY'
import json, sys
d, t0, t1, w0, w1, alive, hz = sys.argv[1:]
cpu = (int(t1) - int(t0)) / int(hz)
wall = float(w1) - float(w0)
log = open(f"{d}/proxy.log", errors="replace").read().splitlines()
problems = [l for l in log if '"level": "error"' in l or '"level":"error"' in l or "Traceback" in l
            or "[error]" in l or "[critical]" in l]
json.dump({"cpu_s": round(cpu, 2), "cpu_pct": round(100 * cpu / wall, 1) if wall else None,
           "alive_after_load": alive == "1", "log_lines": len(log), "log_problem_lines": len(problems),
           "log_problem_sample": problems[:5]}, open(f"{d}/proxy.json", "w"), indent=2)
PY
    DONE_CONFIGS+=("$config")
done

mkdir -p "$OUT"
"$PY" "$HERE/report.py" --run-dir "$RUN" --configs "${DONE_CONFIGS[*]}" --out "$OUT/$STAMP" \
    --meta "$(printf '{"date_utc": "%s", "commit": "%s", "uncommitted_mesh_sidecar_files": %s, "rate": %s, "duration_s": %s, "timeout_s": %s, "connections": %s, "fast_ms": %s, "slow_ms": %s, "fail_percent": %s, "fail_status": 503, "fail_pattern": "%s", "envoy_version": "%s", "pinned": %s}' \
        "$STAMP" "$COMMIT" "$DIRTY" "$RATE" "$DURATION" "$TIMEOUT" "$CONNECTIONS" "$FAST_MS" "$SLOW_MS" "$FAIL_PERCENT" "$FAIL_PATTERN" "$ENVOY_VERSION" "$((${#PROXY_PIN[@]} > 0 ? 1 : 0))")"
