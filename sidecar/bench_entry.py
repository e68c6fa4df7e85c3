"""Benchmark adapter: runs one sidecar as `ROLE LISTEN_PORT FORWARD_PORT` for `shared/bench/peers.sh --sidecar`.

Role `hop` is one sidecar with one plaintext upstream listener (listen → forward), configured with the
defaults a user gets (access log on, level info). Roles `outbound`/`inbound` need mutual TLS and the
mesh CA, which this version does not have yet. Extra YAML settings can be merged in with the
environment variable MESH_BENCH_OVERRIDES (a JSON object, e.g. '{"log": {"access_log": false}}')."""

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
    if role != "hop":
        print(f"role {role!r} needs mutual TLS from the mesh CA, which this version does not have yet", file=sys.stderr)
        return 2
    config = _merge(hop_config(listen, forward), json.loads(os.environ.get("MESH_BENCH_OVERRIDES", "{}")))
    try:
        parsed = parse_config(json.dumps(config), name="<bench>", base_dir=Path.cwd())  # JSON is YAML
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from sidecar.app import run

    return run(parsed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
