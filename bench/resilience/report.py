"""Collects one run.sh run (per-config loadgen.json, proxy.json and admin dumps) into a table,
printed to stdout and written as OUT.json and OUT.md.

    python report.py --run-dir DIR --configs "triomesh-defaults ..." --out results/STAMP --meta JSON"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ENVOY_STATS = {
    "retries": "cluster.api.upstream_rq_retry",
    "retries_ok": "cluster.api.upstream_rq_retry_success",
    "retry_overflow (budget/breaker)": "cluster.api.upstream_rq_retry_overflow",
    "retry_limit_exceeded": "cluster.api.upstream_rq_retry_limit_exceeded",
    "ejections": "cluster.api.outlier_detection.ejections_enforced_total",
    "ejections_active": "cluster.api.outlier_detection.ejections_active",
}


LATE_MS = 10.0  # client send lag p99 above this: something else was using the CPU


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def envoy_details(d: Path) -> dict:
    try:
        text = (d / "admin-stats.txt").read_text()
    except OSError:
        return {}
    stats = dict(re.findall(r"^([\w.]+): (\d+)$", text, re.M))
    return {k: int(stats[v]) for k, v in ENVOY_STATS.items() if v in stats}


def triomesh_details(d: Path) -> dict:
    out: dict = {}
    clusters = load(d / "admin-clusters.json")
    endpoints = []
    keep = ("address", "successes", "failures", "times_ejected", "ejected_by", "ewma_ms")

    def walk(node: object) -> None:  # find the endpoint entries of /clusters, whatever the nesting
        if isinstance(node, dict):
            if "address" in node and "times_ejected" in node:
                entry = {k: node[k] for k in keep if k in node}
                if isinstance(entry.get("ewma_ms"), float):
                    entry["ewma_ms"] = round(entry["ewma_ms"], 1)
                endpoints.append(entry)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(clusters)
    if endpoints:
        out["endpoints"] = endpoints
    try:
        metrics = (d / "admin-metrics.txt").read_text()
    except OSError:
        metrics = ""
    picked = [
        line
        for line in metrics.splitlines()
        if not line.startswith("#") and re.search(r"retr|eject|outlier|mesh_errors", line)
    ]
    if picked:
        out["metrics"] = picked
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--configs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--meta", required=True)
    args = parser.parse_args()
    meta = json.loads(args.meta)
    run = Path(args.run_dir)
    rows = []
    for config in args.configs.split():
        d = run / config
        proxy = load(d / "proxy.json")
        if "skipped" in proxy:
            rows.append({"config": config, "skipped": proxy["skipped"]})
            continue
        lg = load(d / "loadgen.json")
        details = envoy_details(d) if config.startswith("envoy") else triomesh_details(d)
        rows.append({"config": config, "loadgen": lg, "proxy": proxy, "proxy_details": details})

    head = [
        "config",
        "sent",
        "ok",
        "success %",
        "p50 ms",
        "p99 ms",
        "max ms",
        "timeouts",
        "tries fast/failing/slow",
        "extra tries",
        "proxy CPU %",
        "client CPU %",
        "send lag p99 ms",
    ]
    table = []
    warnings: list[str] = []
    for row in rows:
        if "skipped" in row:
            table.append([row["config"], "skipped: " + row["skipped"]] + [""] * (len(head) - 2))
            continue
        lg, proxy = row["loadgen"], row["proxy"]
        if not lg:
            table.append([row["config"], "no result"] + [""] * (len(head) - 2))
            continue
        lat = lg["latency_ms"]
        be = lg.get("backend_received", {})
        tries = [be.get(name, {}).get("requests", 0) for name in ("fast", "failing", "slow")]
        table.append(
            [
                row["config"],
                str(lg["sent"]),
                str(lg["ok"]),
                f"{lg['success_pct']:.2f}",
                f"{lat['p50']:.1f}",
                f"{lat['p99']:.1f}",
                f"{lat['max']:.1f}",
                str(lg["outcomes"].get("timeout", 0)),
                "/".join(map(str, tries)),
                str(sum(tries) - lg["sent"]),
                f"{proxy.get('cpu_pct', '')}",
                f"{lg['client']['cpu_pct']}",
                f"{lg['client']['schedule_lag_ms'].get('p99', '')}",
            ]
        )
        if lg["client"]["schedule_lag_ms"].get("p99", 0) > LATE_MS:
            warnings.append(
                f"{row['config']}: the client sent late (p99 {lg['client']['schedule_lag_ms']['p99']} ms): "
                "something else was using the CPU, so compare its latencies with care"
            )
    widths = [max(len(head[i]), *(len(r[i]) for r in table)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in table]
    print("\n".join(lines))
    for warning in warnings:
        print("WARNING: " + warning)

    md = [
        f"# Resilience run {meta['date_utc']} (commit {meta['commit']}"
        + (
            f", {meta['uncommitted_mesh_sidecar_files']} uncommitted files in mesh/ sidecar/"
            if meta.get("uncommitted_mesh_sidecar_files")
            else ""
        )
        + ")",
        "",
        f"{meta['rate']} req/s for {meta['duration_s']} s per config, client timeout {meta['timeout_s']} s; "
        f"endpoints: fast {meta['fast_ms']} ms, failing {meta['fast_ms']} ms + {meta['fail_percent']} % 503 "
        f"({meta['fail_pattern']}), "
        f"slow {meta['slow_ms']} ms. Envoy {meta.get('envoy_version') or '-'}. Latency from the scheduled send time.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in table]
    md.append("")
    md += [f"- WARNING: {w}" for w in warnings]
    for row in rows:
        if row.get("proxy_details"):
            md.append(f"- {row['config']}: `{json.dumps(row['proxy_details'])}`")
        proxy = row.get("proxy", {})
        if proxy.get("log_problem_lines") or proxy.get("alive_after_load") is False:
            md.append(
                f"- {row['config']}: proxy alive after load: {proxy.get('alive_after_load')}, "
                f"error lines in its log: {proxy.get('log_problem_lines')}"
            )
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"\nwritten: {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
