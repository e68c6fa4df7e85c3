#!/usr/bin/env bash
# HTTP/2 through the mesh beside Envoy: h2load (and wrk) into one plaintext sidecar and into an mTLS pair.
#
#   bench/h2/run.sh [-o DIR] [peers.sh options...]
#
# Runs ../shared/bench/peers.sh --one-core --sidecar-h2 -r ${REPS:-1} -d ${DURATION:-5}
#   -s "envoy-hop triomesh-hop envoy-mesh triomesh-mesh" --sidecar "triomesh=bench/h2/triomesh-h2-adapter"
# then prints, per load, triomesh's proxy CPU-s per 10k requests divided by Envoy's, for the hop and the pair.
#   hop   client -> one proxy -> nginx (HTTP/1.1); h2load speaks h2c to the proxy, wrk HTTP/1.1
#   mesh  client -> outbound =mTLS=> inbound -> nginx (HTTP/1.1); triomesh's outbound upstream has
#         `protocol: http2`, so its mTLS hop is HTTP/2 (Envoy's pair in peers.sh speaks HTTP/1.1 there)
#
#   -o DIR       results directory (default bench/results/h2/<UTC time>, git-ignored)
#   -r N, -d S, -s "LIST"  replace REPS, DURATION and the scenario list
#   anything else is passed to peers.sh as it is, e.g. -c 32, --h2 "16 8", --path /ok, --keep (peers.sh -h)
#
# Environment: REPS, DURATION (defaults 1 and 5), PEERS (default ../shared/bench/peers.sh beside the repo),
# ENVOY_BIN and PORT_OFFSET (peers.sh), H2_MESH_UPSTREAM (JSON merged into the outbound's upstream instead
# of {"protocol": "http2"}), PYTHONPATH (reaches the sidecars, e.g. a directory holding another tree's mesh/
# and sidecar/; triomesh.txt in the results says where they were imported from). Adds /tmp/bench-venv/bin
# (from ../shared/bench/setup.sh) to PATH if envoy is not on it. The whole peers.sh run is under a time
# limit computed from the repetitions, scenarios and loads; every process it starts is stopped by peers.sh,
# also on Ctrl-C. Exits 1 if a scenario failed, a load saw errors or an mTLS check failed (the table is
# printed first).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PEERS=${PEERS:-$(cd "$ROOT/.." && pwd)/shared/bench/peers.sh}
ADAPTER=$HERE/triomesh-h2-adapter

REPS=${REPS:-1} DURATION=${DURATION:-5}
SCENARIOS="envoy-hop triomesh-hop envoy-mesh triomesh-mesh"
CONNS="32 128"
OUT=
PASS=()
while (($#)); do
    case $1 in
    -o) OUT=${2:?-o needs a directory}; shift 2 ;;
    -r) REPS=${2:?-r needs a number}; shift 2 ;;
    -d) DURATION=${2:?-d needs seconds}; shift 2 ;;
    -s) SCENARIOS=${2:?-s needs a scenario list}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *)
        [[ $1 == -c ]] && CONNS=${2:?-c needs connection counts} # passed on too; kept for the time limit
        PASS+=("$1"); shift ;;
    esac
done
[[ $REPS =~ ^[0-9]+$ && $DURATION =~ ^[0-9]+$ ]] || { echo "run.sh: REPS and DURATION must be whole numbers" >&2; exit 2; }

[[ -x $PEERS ]] || { echo "run.sh: $PEERS not found (set PEERS=/path/to/peers.sh)" >&2; exit 1; }
[[ -x $ROOT/.venv/bin/python ]] || { echo "run.sh: $ROOT/.venv is missing; run ./scripts/test once to create it" >&2; exit 1; }
if [[ -z ${ENVOY_BIN:-} ]] && ! command -v envoy >/dev/null && [[ -x /tmp/bench-venv/bin/envoy ]]; then
    PATH=/tmp/bench-venv/bin:$PATH
fi
command -v h2load >/dev/null || { echo "run.sh: h2load is missing (apt-get install nghttp2-client, or ../shared/bench/setup.sh)" >&2; exit 1; }
[[ -n ${ENVOY_BIN:-} ]] || command -v envoy >/dev/null ||
    echo "run.sh: no envoy found (ENVOY_BIN or PATH): peers.sh will skip the Envoy scenarios and the table has no ratios" >&2

OUT=${OUT:-$ROOT/bench/results/h2/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Time limit: every step of peers.sh is bounded already (readiness 165 s at worst, warm-up, each load run
# DURATION + 20 s, 5 s per stop); this is the backstop over all of them.
read -r -a scn <<<"$SCENARIOS"
read -r -a conns <<<"$CONNS"
LIMIT=$((120 + REPS * ${#scn[@]} * (220 + (${#conns[@]} + 1) * (DURATION + 25))))

CMD=("$PEERS" --one-core --sidecar-h2 -r "$REPS" -d "$DURATION" -s "$SCENARIOS" --sidecar "triomesh=$ADAPTER" -o "$OUT" "${PASS[@]}")
printf 'h2: %s (time limit %ss)\n' "${CMD[*]}" "$LIMIT" >&2
printf '%q ' "${CMD[@]}" >"$OUT/command.txt"
echo >>"$OUT/command.txt"
{ # which code the sidecars run: the adapter imports it from peers.sh's directory, PYTHONPATH first
    echo "repo commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted files in mesh/ sidecar/: $(git -C "$ROOT" status --porcelain -- mesh sidecar 2>/dev/null | wc -l)"
    echo "PYTHONPATH: ${PYTHONPATH:-}"
    (cd "$(dirname "$PEERS")" && "$ROOT/.venv/bin/python" -c \
        'import mesh, sidecar, sys; print("python:", sys.version.split()[0]); print("mesh from:", mesh.__file__); print("sidecar from:", sidecar.__file__)')
} >"$OUT/triomesh.txt" 2>&1

# peers.sh runs in the background and is waited for, so that Ctrl-C / TERM reach this script's trap at once;
# the trap passes TERM on (timeout relays it to peers.sh, whose own trap stops everything it started).
timeout -k 30 "$LIMIT" "${CMD[@]}" &
PEERS_PID=$!
trap 'kill -TERM "$PEERS_PID" 2>/dev/null || true' INT TERM
rc=0
while :; do
    wait "$PEERS_PID" && rc=0 || rc=$?
    kill -0 "$PEERS_PID" 2>/dev/null || break # wait returned for a signal: wait again for the cleanup
done
trap - INT TERM
((rc == 124)) && echo "run.sh: peers.sh hit the ${LIMIT}s time limit" >&2
((rc == 0)) || { echo "run.sh: peers.sh exited with $rc; partial results in $OUT" >&2; exit 1; }

python3 - "$OUT" <<'PY'
import csv, os, statistics, sys

out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "results.tsv")), delimiter="\t"))
problems = []

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

loads = []
for r in rows:
    if r["load"] in ("skipped", "failed"):
        problems.append(f"rep {r['rep']} {r['scenario']}: {r['load']}")
        continue
    if r["load"] not in loads:
        loads.append(r["load"])
    if num(r["errors"]) != 0:
        problems.append(f"rep {r['rep']} {r['scenario']} {r['load']}: errors={r['errors']}")

def med(scenario, load, col):
    vals = [num(r[col]) for r in rows if r["scenario"] == scenario and r["load"] == load]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"

reps = len({r["rep"] for r in rows})
print()
print(f"Proxy CPU-s per 10k requests (median of {reps} repetition(s); mesh = both proxies of the pair), "
      "and triomesh / Envoy:")
print()
print("| shape | load | Envoy | triomesh | triomesh / Envoy | rps Envoy / triomesh |")
print("|---|---|---:|---:|---:|---:|")
for shape in ("hop", "mesh"):
    for load in loads:
        e = med(f"envoy-{shape}", load, "proxy_cpu_s_per_10k")
        t = med(f"triomesh-{shape}", load, "proxy_cpu_s_per_10k")
        if e is None and t is None:
            continue
        ratio = f"**{t / e:.2f}x**" if e and t is not None else "-"
        er, tr = med(f"envoy-{shape}", load, "rps"), med(f"triomesh-{shape}", load, "rps")
        print(f"| {shape} | {load} | {fmt(e)} | {fmt(t)} | {ratio} | {fmt(er, 0)} / {fmt(tr, 0)} |")

try:
    checks = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "mtls_checks.tsv")) if l.strip()]
except FileNotFoundError:
    checks = []
for c in checks:
    if c[-1] != "ok":
        problems.append(f"mTLS check {c[0]} ({c[1]}): {c[2]} -> {c[-1]}")
print()
print(f"mTLS checks: {sum(c[-1] == 'ok' for c in checks)} ok, {sum(c[-1] != 'ok' for c in checks)} failed")
for p in problems:
    print(f"PROBLEM: {p}")
print(f"results: {out} (summary.md, results.tsv, raw/)")
sys.exit(1 if problems else 0)
PY
