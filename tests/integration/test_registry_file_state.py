"""A broken registry file as a running sidecar reports it: `/clusters` `stale_reason` and `mesh_discovery_stale`."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from .conftest import Mesh, free_port, sidecar_config


def admin_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def stale_metric(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return next((line for line in lines if line.startswith("mesh_discovery_stale{")), None)


def replace(path: Path, text: str) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def client(registry: Path, admin: int) -> dict:
    return sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{free_port()}", "tls": "off"}],
        discovery={"file": str(registry)},
        admin={"bind": f"127.0.0.1:{admin}"},
    )


def test_a_broken_registry_marks_the_kept_endpoints_stale_until_fixed(mesh: Mesh, tmp_path: Path) -> None:
    registry, admin = tmp_path / "registry.yaml", free_port()
    good = "services: {api: [127.0.0.1:15001]}\n"
    registry.write_text(good)
    proc = mesh.sidecar(client(registry, admin))
    assert admin_json(admin, "/clusters")["api"]["stale_reason"] is None
    assert stale_metric(admin) == 'mesh_discovery_stale{upstream="api"} 0.0'

    replace(registry, "services: {api: [127.0.0.1:99999]}\n")
    proc.wait_for('"registry reload failed; keeping the last good endpoints"')
    api = admin_json(admin, "/clusters")["api"]
    assert api["stale_reason"] == f"{registry}: services.api[0].address: port 99999 out of range"
    assert [e["address"] for e in api["endpoints"]] == ["127.0.0.1:15001"]
    assert stale_metric(admin) == 'mesh_discovery_stale{upstream="api"} 1.0'

    replace(registry, good)
    proc.wait_for('"registry reloaded"')
    assert admin_json(admin, "/clusters")["api"]["stale_reason"] is None
    assert stale_metric(admin) == 'mesh_discovery_stale{upstream="api"} 0.0'


def test_a_registry_broken_since_start_says_why_the_service_is_unresolved(mesh: Mesh, tmp_path: Path) -> None:
    registry, admin = tmp_path / "registry.yaml", free_port()
    registry.write_text("services: {api: [nowhere]}\n")
    mesh.sidecar(client(registry, admin))
    api = admin_json(admin, "/clusters")["api"]
    assert api["resolved"] is False
    assert api["stale_reason"] == f"{registry}: services.api[0].address: expected host:port (got 'nowhere')"
