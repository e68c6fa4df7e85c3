"""Benchmark adapter: runs one sidecar as `ROLE LISTEN_PORT FORWARD_PORT` for `shared/bench/peers.sh --sidecar`.

Role `hop` is one sidecar with one plaintext upstream listener (listen → forward), configured with the
defaults a user gets (access log off, level info). Role `outbound` is a client-only sidecar whose
upstream listener reaches FORWARD over mutual TLS; role `inbound` is a sidecar whose mTLS inbound
listener forwards to the app on FORWARD. Their certificates, trust bundle and identities come from the
harness's BENCH_* variables. Extra settings can be merged in with the environment variable
MESH_BENCH_OVERRIDES (a JSON object, e.g. '{"log": {"access_log": true}}'), and into each upstream with
MESH_BENCH_UPSTREAM (e.g. '{"mesh_http2": false}' for an HTTP/1.1 mesh hop)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mesh.config import ConfigError, parse_config

USAGE = "usage: python -m sidecar.bench_entry hop|outbound|inbound LISTEN_PORT FORWARD_PORT"


def hop_config(listen: int, forward: int) -> dict:
    return {
        "service": {"name": "bench", "app": f"127.0.0.1:{forward}"},
        "upstreams": [{"service": "backend", "bind": f"127.0.0.1:{listen}", "tls": "off"}],
        "discovery": {"static": {"backend": [f"127.0.0.1:{forward}"]}},
        "admin": {"bind": "127.0.0.1:0"},
    }


def outbound_config(listen: int, forward: int, env: dict[str, str]) -> dict:
    upstream = {"service": "backend", "bind": f"127.0.0.1:{listen}", "tls": "mutual"}
    if env.get("BENCH_INBOUND_SPIFFE"):
        upstream["identity"] = env["BENCH_INBOUND_SPIFFE"]
    return {
        "service": {"name": "bench", "app": "127.0.0.1:1"},
        "upstreams": [upstream],
        "discovery": {"static": {"backend": [f"127.0.0.1:{forward}"]}},
        "identity": {
            "files": {"cert": env["BENCH_OUTBOUND_CERT"], "key": env["BENCH_OUTBOUND_KEY"], "bundle": env["BENCH_CA"]}
        },
        "admin": {"bind": "127.0.0.1:0"},
    }


def inbound_config(listen: int, forward: int, env: dict[str, str]) -> dict:
    inbound: dict = {"bind": f"127.0.0.1:{listen}", "tls": "mutual"}
    if env.get("BENCH_OUTBOUND_SPIFFE"):
        inbound["allow"] = [env["BENCH_OUTBOUND_SPIFFE"]]
    return {
        "service": {"name": "backend", "app": f"127.0.0.1:{forward}"},
        "inbound": inbound,
        "identity": {
            "files": {"cert": env["BENCH_INBOUND_CERT"], "key": env["BENCH_INBOUND_KEY"], "bundle": env["BENCH_CA"]}
        },
        "admin": {"bind": "127.0.0.1:0"},
    }


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    role, listen, forward = argv[0], int(argv[1]), int(argv[2])
    builders = {"hop": lambda: hop_config(listen, forward)}
    builders["outbound"] = lambda: outbound_config(listen, forward, dict(os.environ))
    builders["inbound"] = lambda: inbound_config(listen, forward, dict(os.environ))
    if role not in builders:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        base = builders[role]()
    except KeyError as missing:
        print(f"role {role} needs the environment variable {missing.args[0]} (set by peers.sh)", file=sys.stderr)
        return 2
    config = _merge(base, json.loads(os.environ.get("MESH_BENCH_OVERRIDES", "{}")))
    for upstream in config.get("upstreams", []):
        _merge(upstream, json.loads(os.environ.get("MESH_BENCH_UPSTREAM", "{}")))
    try:
        parsed = parse_config(json.dumps(config), name="<bench>", base_dir=Path.cwd())  # JSON is YAML
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from sidecar.app import run

    return run(parsed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
