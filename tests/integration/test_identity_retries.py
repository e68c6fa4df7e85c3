"""A peer that fails the identity check is never tried again for the same request: the check would fail again."""

from __future__ import annotations

import urllib.request

from .clients import backend_stats, request
from .conftest import free_port, sidecar_config
from .test_mtls import authority, write_identity

__all__ = ["authority"]  # the module-scoped CA fixture, shared with test_mtls


def metric(admin_port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def inbound(mesh, tmp_path, authority, app_port: int, issued_to: str) -> int:
    port = free_port()
    config = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{app_port}"},
        inbound={"bind": f"127.0.0.1:{port}", "tls": "mutual", "allow": ["web"]},
        identity=write_identity(tmp_path / f"in-{port}", authority.issue(issued_to)),
    )
    mesh.sidecar(config, f"inbound-{issued_to}-{port}")
    return port


def outbound(mesh, tmp_path, authority, endpoints: list[int]) -> tuple[int, int]:
    port, admin = free_port(), free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[
            {
                "service": "api",
                "bind": f"127.0.0.1:{port}",
                "tls": "mutual",
                "balancer": {"policy": "round_robin"},
                "outlier": {"consecutive_failures": 0},
            }
        ],
        discovery={"static": {"api": [f"127.0.0.1:{p}" for p in endpoints]}},
        identity=write_identity(tmp_path / "web", authority.issue("web")),
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    mesh.sidecar(config, "outbound")
    return port, admin


def test_an_impostor_endpoint_is_tried_once(mesh, tmp_path, authority, backend) -> None:
    impostor = inbound(mesh, tmp_path, authority, backend["http"], "db")  # a valid mesh certificate, not api's
    port, admin = outbound(mesh, tmp_path, authority, [impostor])
    before = backend_stats(backend["http"])["requests"]
    response = request(port, "GET", "/status?code=200")
    assert response.status == 502
    assert response.headers["x-mesh-error"].startswith("upstream identity mismatch")
    assert metric(admin, "mesh_retries_total", upstream="api", reason="connect_failure") == 0
    assert metric(admin, "mesh_errors_total", direction="outbound", upstream="api", reason="tls_identity") == 1
    assert backend_stats(backend["http"])["requests"] == before


def test_a_request_refused_by_an_impostor_is_retried_on_another_endpoint(mesh, tmp_path, authority, backend) -> None:
    impostor = inbound(mesh, tmp_path, authority, backend["http"], "db")
    genuine = inbound(mesh, tmp_path, authority, backend["http"], "api")
    port, admin = outbound(mesh, tmp_path, authority, [impostor, genuine])
    statuses = [request(port, "GET", "/status?code=200").status for _ in range(6)]
    assert statuses == [200] * 6  # a first try that met the impostor went on to the genuine endpoint
    assert 1 <= metric(admin, "mesh_retries_total", upstream="api", reason="connect_failure") <= 6
