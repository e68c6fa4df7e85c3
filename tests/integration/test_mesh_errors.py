"""Errors the mesh makes itself: 502/503/504 with `x-mesh-error`, each inside its configured timeout."""

from __future__ import annotations

import socket
import time

from .clients import request
from .conftest import free_port, sidecar_config


def outbound_to(mesh, endpoints: list[str], discovery: dict | None = None, **upstream: object) -> int:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", **upstream}],
        discovery=discovery or {"static": {"api": endpoints}},
    )
    mesh.sidecar(config, "outbound")
    return port


def test_no_endpoints_is_503(mesh, tmp_path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text("services: {api: []}\n")
    port = outbound_to(mesh, [], discovery={"file": str(registry)})
    response = request(port, "GET", "/")
    assert response.status == 503
    assert response.headers["x-mesh-error"] == "no healthy endpoints"


def test_never_resolved_is_503_discovery_unavailable(mesh, tmp_path) -> None:
    port = outbound_to(mesh, [], discovery={"file": str(tmp_path / "missing.yaml")})
    response = request(port, "GET", "/")
    assert response.status == 503
    assert response.headers["x-mesh-error"] == "discovery unavailable"


def test_connection_refused_is_502(mesh) -> None:
    port = outbound_to(mesh, [f"127.0.0.1:{free_port()}"])
    response = request(port, "GET", "/")
    assert response.status == 502
    assert response.headers["x-mesh-error"] == "upstream connect refused"


def test_connect_timeout_is_504_within_the_timeout(mesh) -> None:
    # A listener that never accepts and whose backlog is full: the kernel drops further SYNs.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        address = f"127.0.0.1:{blackhole.getsockname()[1]}"
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(blackhole.getsockname())
            fillers.append(filler)
        port = outbound_to(mesh, [address], timeouts={"connect": "500ms"})
        start = time.monotonic()
        response = request(port, "GET", "/")
        elapsed = time.monotonic() - start
        for filler in fillers:
            filler.close()
    assert response.status == 504
    assert response.headers["x-mesh-error"] == "upstream connect timeout"
    assert elapsed < 3


def test_request_timeout_is_504_within_the_timeout(mesh, backend) -> None:
    port, _, _ = mesh.pair(backend["http"], outbound={"timeouts": {"request": "1s"}})
    start = time.monotonic()
    response = request(port, "GET", "/slow?s=5")
    elapsed = time.monotonic() - start
    assert response.status == 504
    assert response.headers["x-mesh-error"] == "upstream request timeout"
    assert elapsed < 3


def test_app_down_behind_the_inbound_is_502_with_reason(mesh) -> None:
    port, _, _ = mesh.pair(free_port())
    response = request(port, "GET", "/")
    assert response.status == 502
    assert response.headers["x-mesh-error"] == "upstream connect refused"
